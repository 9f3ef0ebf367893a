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


def _batch_dynamic_shapes(example_input: torch.Tensor, dynamic_batch: bool) -> tuple[dict[int, Any]] | None:
    if not dynamic_batch:
        return None
    if example_input.dim() == 0:
        raise ValueError("dynamic_batch needs an example input with a batch dimension (dim 0)")
    return ({0: torch.export.Dim("batch")},)


def _size_oblivious(enabled: bool) -> contextlib.AbstractContextManager:
    """Without this, torch.export specialises a dynamic dim whose example size is 1 and refuses the export."""
    config = getattr(torch.fx.experimental, "_config", None)
    if enabled and config is not None and hasattr(config, "backed_size_oblivious"):
        return config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def export_program(model: nn.Module, example_input: torch.Tensor, *,
                   dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` the model in eval mode (no grad) on ``example_input``; the model's modes are restored.

    ``dynamic_batch`` marks dim 0 of the input dynamic (default: the program is specialised to the example's shape);
    an example batch of 1 works too (sizes 0/1 are traced size-obliviously, as ``torch.onnx.export`` does).
    """
    with _eval_no_grad(model), _size_oblivious(dynamic_batch):
        return torch.export.export(model, (example_input,),
                                   dynamic_shapes=_batch_dynamic_shapes(example_input, dynamic_batch))


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
                opset: int | None = None, dynamic_batch: bool = True) -> Path:
    """Write ``model`` as an ONNX file at ``path`` with the dynamo-based exporter; returns the path.

    One input ``input`` and one output ``output``; with ``dynamic_batch`` dim 0 of both is symbolic, so the file
    runs on any batch size. ``opset`` is the ``ai.onnx`` opset (``None``: the exporter's recommended one).
    The file is written in a temporary folder beside ``path`` and moved into place (external data first, then
    the model), so a reader never sees a half-written model.
    """
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_no_grad(model):
        program = torch.onnx.export(
            model, (example_input,), dynamo=True, opset_version=opset, verbose=False,
            input_names=["input"], output_names=["output"],
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


def run_onnx(path: str | os.PathLike, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run the ONNX model at ``path`` on ``x`` with ONNX Runtime (CPU); returns its first output."""
    ort = _require("onnxruntime", "Running an ONNX model")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(x)})[0]
