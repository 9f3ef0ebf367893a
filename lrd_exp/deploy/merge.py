"""Deployment takes the faster form of each decomposed layer: its factors, or their product as one dense layer.

Training keeps the factors (freezing needs them). For inference a factorized layer is the same function as the
dense layer whose weight is the product of its factors (not the original weights), and on some devices and
shapes the dense layer is faster (a thin factor is memory-bound, three small kernels cost three launches).
:func:`merge_for_inference` times both forms of every decomposed layer at its real input shape, on the run's
device and precision (as the rank search times a layer: :func:`lrd_exp.timing.layer.time_module`), and keeps the
faster, so the deployed model infers at least as fast as the factored one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrd_exp.batches import Batch, first_tensor
from lrd_exp.config.values import canonical_precision
from lrd_exp.decompose.capture import watch
from lrd_exp.decompose.layers import FactorizedLayer, SVDConv1x1, SVDLinear, reconstruct_weight
from lrd_exp.decompose.registry import build_dense
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.timing.layer import time_module
from lrd_exp.timing.steps import cast_dtype, eval_forward


def merged_layer(layer: FactorizedLayer) -> nn.Module:
    """The dense layer computing the same function as ``layer``: weight = the product of its factors. A linear
    one is of the type it replaced (a ``Conv1D`` stays a ``Conv1D``), so its weight has the layout the original's
    parent and a model file expect."""
    weight = reconstruct_weight(layer)
    last = layer.factors()["last"]
    bias = last.bias.detach() if last.bias is not None else None
    if isinstance(layer, SVDLinear):
        return build_dense(layer.dense_type, weight, bias)
    geometry = layer.first if isinstance(layer, SVDConv1x1) else layer.core  # where stride & padding live
    dense = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2:], stride=geometry.stride,
                      padding=geometry.padding, dilation=geometry.dilation, bias=bias is not None,
                      padding_mode=geometry.padding_mode, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


@dataclass
class MergeReport:
    """Per decomposed layer: the inference time of both forms and which one the deployed model keeps."""

    layers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def layers_merged(self) -> int:
        return sum(1 for layer in self.layers if layer["merged"])

    def summary(self) -> str:
        return f"deployed: {self.layers_merged} of {len(self.layers)} decomposed layers merged (faster dense)"


def _inputs(model: nn.Module, example_input: Batch) -> dict[str, torch.Tensor]:
    """The input each factorized layer sees in one eval forward of ``example_input``."""
    seen: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    with watch(layers, lambda name, _m, x, _out: seen.setdefault(name, x.detach()), before=True):
        eval_forward(model, example_input)
    return seen


def merge_for_inference(model: nn.Module, example_input: Batch, *, device: DeviceInfo | None = None,
                        precision: str = "32-true", channels_last: bool = False, warmup: int = 3,
                        steps: int = 20) -> MergeReport:
    """Replace, in place, every factorized layer whose merged dense form infers faster; return what was chosen.

    ``example_input``: a tensor, a tuple (``model(*x)``) or a dict (``model(**x)``, a tokenizer's output). Each
    layer is timed alone at the input it sees for it (its batch, shape and layout), in
    ``precision`` (cast for ``*-true``, autocast for ``*-mixed``), under ``torch.inference_mode``. A layer that no
    forward of ``example_input`` reaches keeps its factors. Ties keep the factors (fewer parameters).
    """
    precision = canonical_precision(precision)
    dev = device.torch_device if device is not None else first_tensor(example_input).device
    cast = cast_dtype(precision)
    inputs = _inputs(model, example_input)
    report = MergeReport()
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLayer)]:
        if name not in inputs:
            report.layers.append({"name": name, "kind": type(layer).__name__, "factored_ms": None,
                                  "merged_ms": None, "merged": False})
            continue
        dense = merged_layer(layer)
        x = inputs[name].to(dev, dtype=cast or inputs[name].dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        times = {}
        for form, module in (("factored", layer), ("merged", dense)):
            work = copy.deepcopy(module).to(dev).eval()
            if cast is not None:
                work = work.to(cast)
            if channels_last and x.dim() == 4:
                work = work.to(memory_format=torch.channels_last)
            times[form] = time_module(work, x, precision=precision, objective="inference", warmup=warmup,
                                      steps=steps, device=device)
        merge = times["merged"] < times["factored"]
        if merge:
            model.set_submodule(name, dense.to(layer.factors()["first"].weight.device))
        report.layers.append({"name": name, "kind": type(layer).__name__, "factored_ms": times["factored"] * 1e3,
                              "merged_ms": times["merged"] * 1e3, "merged": merge})
    return report
