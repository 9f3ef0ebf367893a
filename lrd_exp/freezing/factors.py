"""The factors of a decomposed model, what each costs to train, and how one is frozen.

A frozen factor's weight gets ``requires_grad=False`` and its ``.grad`` is dropped, so autograd skips its
weight-gradient GEMM and the optimizer skips it entirely (no momentum, no weight decay).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrd_exp.batches import Batch, batch_size_of, first_samples
from lrd_exp.decompose.capture import watch
from lrd_exp.decompose.layers import FactorizedLayer
from lrd_exp.timing.steps import eval_forward

log = logging.getLogger("lrd_exp")


@dataclass
class Factor:
    """One factor of one decomposed layer: the unit a schedule freezes."""

    layer: str
    position: str
    module: nn.Module
    depth: int

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.position}"

    def parameters(self, with_bias: bool) -> list[nn.Parameter]:
        params = [self.module.weight]
        if with_bias and getattr(self.module, "bias", None) is not None:
            params.append(self.module.bias)
        return params

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def collect_factors(model: nn.Module) -> list[Factor]:
    """Every factor of every decomposed layer, in module (depth) order."""
    factors = []
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLayer):
            for position, factor in module.factors().items():
                factors.append(Factor(name, position, factor, len(factors)))
    return factors


def factor_costs(model: nn.Module, example_input: Batch) -> dict[str, int]:
    """Weight-gradient FLOPs per sample of every factor: what freezing it saves in each training step.

    A factor's weight gradient is one GEMM as large as its forward: 2 x weight elements x output positions
    (pixels of a conv, tokens of a linear), so a small factor at high resolution can cost more than a large one
    at low resolution. The positions come from one eval-mode, no-grad forward of ``example_input``: BatchNorm
    statistics, gradients and the random state are left as they were.
    """
    factors = collect_factors(model)
    batch = max(batch_size_of(example_input), 1)
    positions: dict[str, int] = {}

    def record(key: str, module: nn.Module, _x: torch.Tensor, out: torch.Tensor) -> None:
        # a factor called twice costs twice
        positions[key] = positions.get(key, 0) + max(out.numel() // (batch * module.weight.shape[0]), 1)

    with watch({f.key: f.module for f in factors}, record):
        eval_forward(model, example_input)
    # a factor the eval forward never reached (a training-only branch) counts one position
    return {f.key: 2 * f.numel * positions.get(f.key, 1) for f in factors}


def measure_factor_costs(model: nn.Module, example: Any) -> dict[str, int]:
    """:func:`factor_costs` on one sample of ``example`` (a tensor, tuple or dict batch); {} (the size order) with
    one warning when it holds no tensor or the forward fails: ordering a freeze schedule must never end a run."""
    try:
        return factor_costs(model, first_samples(example, 1))
    except Exception as exc:
        log.warning("freeze.importance=cost could not measure the factors' output positions (%s): "
                    "freezing the largest factors first instead", exc)
        return {}


def frozen_parameters(factors: Sequence[Factor]) -> set[nn.Parameter]:
    """The factors' weights and biases that are frozen now: taken before a schedule starts, what the user froze."""
    return {p for f in factors for p in f.parameters(with_bias=True) if not p.requires_grad}


def set_frozen(factors: Sequence[Factor], frozen: Iterable[Factor], with_bias: bool = False,
               keep_frozen: Iterable[nn.Parameter] = ()) -> None:
    """Apply a frozen set: frozen weights lose requires_grad and their stale gradient; the rest train.

    ``keep_frozen`` (what the user froze before the schedule, see :func:`frozen_parameters`) is never re-enabled:
    a schedule only thaws what it froze itself.
    """
    frozen_keys = {f.key for f in frozen}
    kept = {id(p) for p in keep_frozen}
    for f in factors:
        freeze = f.key in frozen_keys
        for p in f.parameters(with_bias):
            if id(p) in kept:
                continue
            p.requires_grad_(not freeze)
            if freeze:
                p.grad = None
        bias = getattr(f.module, "bias", None)
        if not with_bias and bias is not None and id(bias) not in kept:
            bias.requires_grad_(True)


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
