"""Export the deployed model to ``torch.export`` and ONNX, so the factored (or merged) network runs outside PyTorch.

The decomposed model is the product: its factor layers (:class:`~lrd_exp.SVDLinear`, :class:`~lrd_exp.SVDConv1x1`,
:class:`~lrd_exp.Tucker2Conv`) are chains of plain ``nn.Linear`` / ``nn.Conv2d``, so they trace to ordinary graph
ops and any runtime that runs the original network runs the compressed one (ONNX Runtime, TensorRT, mobile).

* :func:`export_program` -- a :class:`torch.export.ExportedProgram` (AOT-Inductor, ExecuTorch, further lowering).
* :func:`export_onnx` -- an ``.onnx`` file via the dynamo-based ``torch.onnx.export`` (needs ``onnx`` and
  ``onnxscript``), batch dimension dynamic by default.
* :func:`run_onnx` -- run that file in ONNX Runtime on the CPU (checks, benchmarks).

The ONNX extras are optional: ``pip install 'lrd-exp[export]'`` (``pip install -e '.[export]'`` in a checkout).
Models whose weights exceed ONNX's 2 GB protobuf limit are written with their weights in a side file
``<name>.onnx.data`` next to the model (the exporter decides); keep the two files together. Small models are one
self-contained file.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lrd_exp.batches import Batch, as_call, batch_size_of, first_tensor

_EXTRA_HINT = "pip install 'lrd-exp[export]' (in a checkout: pip install -e '.[export]')"


def _require(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{purpose} needs the '{module}' package, which is not installed: {_EXTRA_HINT}") from None


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no grad for the block; every submodule's own mode comes back after (frozen BN stays eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for m, training in modes:
            m.training = training


def _batch_dynamic_shapes(example_input: Batch, dynamic_batch: bool) -> Any:
    """Dim 0 of every input that has the batch's leading size marked as one dynamic ``batch`` dim, in the
    structure of the call (a tuple of positional inputs, a dict of keyword inputs)."""
    if not dynamic_batch:
        return None
    if first_tensor(example_input).dim() == 0:
        raise ValueError("dynamic_batch needs an example input with a batch dimension (dim 0)")
    size, dim = batch_size_of(example_input), torch.export.Dim("batch")

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {0: dim} if value.dim() and value.shape[0] == size else None
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(spec(v) for v in value)
        return None

    args, kwargs = as_call(example_input)
    return spec(kwargs) if kwargs else spec(args)


def _size_oblivious(enabled: bool) -> contextlib.AbstractContextManager:
    """Without this, torch.export specialises a dynamic dim whose example size is 1 and refuses the export."""
    config = getattr(torch.fx.experimental, "_config", None)
    if enabled and config is not None and hasattr(config, "backed_size_oblivious"):
        return config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def export_program(model: nn.Module, example_input: Batch, *,
                   dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode (no grad) on ``example_input`` (a tensor, a tuple of positional
    inputs, or a dict of keyword inputs such as a tokenizer's output); the model's modes are restored.

    ``dynamic_batch`` marks dim 0 of the input dynamic (default: the program is specialised to the example's shape);
    an example batch of 1 works too (sizes 0/1 are traced size-obliviously, as ``torch.onnx.export`` does).
    """
    args, kwargs = as_call(example_input)
    with _eval_no_grad(model), _size_oblivious(dynamic_batch):
        return torch.export.export(model, args, kwargs=kwargs or None,
                                   dynamic_shapes=_batch_dynamic_shapes(example_input, dynamic_batch))


def export_onnx(model: nn.Module, example_input: Batch, path: str | os.PathLike, *,
                opset: int | None = None, dynamic_batch: bool = True) -> Path:
    """Write ``model`` as an ONNX file at ``path`` with the dynamo-based exporter; returns the path.

    A tensor ``example_input`` is the one input ``input``; a dict's keys name the inputs (keyword arguments, as a
    tokenizer's output), a tuple's are ``input_0``, ``input_1``, ... The first output is ``output``. With
    ``dynamic_batch`` dim 0 of every batched input and output is symbolic, so the file runs on any batch size.
    ``opset`` is the ``ai.onnx`` opset (``None``: the exporter's recommended one).
    The file is written in a temporary folder beside ``path`` and moved into place (external data first, then
    the model), so a reader never sees a half-written model.
    """
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args, kwargs = as_call(example_input)
    names = list(kwargs) if kwargs else (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    with _eval_no_grad(model):
        program = torch.onnx.export(
            model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset, verbose=False,
            input_names=names, output_names=["output"],
            dynamic_shapes=_batch_dynamic_shapes(example_input, dynamic_batch),
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        program.save(tmp / path.name)  # keeps the final name: an external-data file is referenced by name
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # the model file last
        for f in written:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def run_onnx(path: str | os.PathLike, x: Any) -> np.ndarray:
    """Run the ONNX model at ``path`` on ``x`` with ONNX Runtime (CPU); returns its first output. ``x`` is what
    the model was exported on: a tensor or array, a tuple (by position) or a dict (by input name)."""
    ort = _require("onnxruntime", "Running an ONNX model")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def array(value: Any) -> np.ndarray:
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        return np.ascontiguousarray(value)

    if isinstance(x, dict):
        feeds = {k: array(v) for k, v in x.items() if k in names}  # an input the graph dropped is not fed
    elif isinstance(x, (tuple, list)):
        feeds = {name: array(v) for name, v in zip(names, x)}
    else:
        feeds = {names[0]: array(x)}
    return session.run(None, feeds)[0]
