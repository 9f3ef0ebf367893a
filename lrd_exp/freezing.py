"""Freeze schedules for the factors of decomposed layers, and the Lightning callback that applies them.

A frozen factor's weight gets ``requires_grad=False`` and its ``.grad`` is dropped, so autograd skips its
weight-gradient GEMM and the optimizer skips it entirely (no momentum, no weight decay). Two readings of the
paper are supported (see PAPER.md): ``sequential`` (progressive: freeze more factors stage by stage, least
important first) and ``alternating`` (only some factor positions train at a time), plus static ablations.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lrd_exp.config import enum_value
from lrd_exp.decompose.layers import POSITIONS, FactorizedLayer

SCHEDULES = ("none", "sequential", "alternating", "first", "last", "largest")
IMPORTANCES = ("weight_change", "grad_norm", "depth", "reverse_depth", "size", "cost")
MEASURED = ("weight_change", "grad_norm")
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


def factor_costs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Weight-gradient FLOPs per sample of every factor: what freezing it saves in each training step.

    A factor's weight gradient is one GEMM as large as its forward: 2 x weight elements x output positions
    (pixels of a conv, tokens of a linear), so a small factor at high resolution can cost more than a large one
    at low resolution. The positions come from one eval-mode, no-grad forward of ``example_input``: BatchNorm
    statistics, gradients and the random state are left as they were.
    """
    factors = collect_factors(model)
    batch = max(int(example_input.shape[0]), 1)
    positions: dict[str, int] = {}

    def recorder(key: str, out_features: int) -> Any:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:  # a factor called twice costs twice
            positions[key] = positions.get(key, 0) + max(out.numel() // (batch * out_features), 1)
        return hook

    handles = [f.module.register_forward_hook(recorder(f.key, f.module.weight.shape[0])) for f in factors]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():  # parents first, so each module ends in its own mode
            m.train(mode)
    # a factor the eval forward never reached (a training-only branch) counts one position
    return {f.key: 2 * f.numel * positions.get(f.key, 1) for f in factors}


def measure_factor_costs(model: nn.Module, example: Any) -> dict[str, int]:
    """:func:`factor_costs` on one sample of ``example``; {} (the size order) with one warning when ``example`` is
    not a tensor or the forward fails: ordering a freeze schedule must never end a run."""
    try:
        if not torch.is_tensor(example):
            raise TypeError(f"the input is a {type(example).__name__}, not a tensor")
        return factor_costs(model, example[:1])
    except Exception as exc:
        log.warning("freeze.importance=cost could not measure the factors' output positions (%s): "
                    "freezing the largest factors first instead", exc)
        return {}


def _get(cfg: Any, key: str, default: Any) -> Any:
    return enum_value(cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default))


class FreezeSchedule:
    """Which factors are frozen at a point in training (``t`` in the schedule's unit: epochs or steps)."""

    def __init__(self, cfg: Any, factors: Sequence[Factor]) -> None:
        self.name = _get(cfg, "schedule", "none")
        if self.name not in SCHEDULES:
            raise ValueError(f"freeze.schedule={self.name!r} is not allowed: choose one of {', '.join(SCHEDULES)}")
        self.unit = _get(cfg, "unit", "epoch")
        self.warmup = int(_get(cfg, "warmup", 0))
        self.period = int(_get(cfg, "period", 1))
        self.per_stage = float(_get(cfg, "per_stage", 0.25))
        self.final_fraction = float(_get(cfg, "final_fraction", 0.75))
        self.importance = _get(cfg, "importance", "weight_change")
        self.positions = list(_get(cfg, "positions", POSITIONS))
        self.phases = [list(p) for p in _get(cfg, "phases", [["last"], ["first", "core"]])]
        self.freeze_bias = bool(_get(cfg, "freeze_bias", False))
        validate_freeze(self)
        self.factors = list(factors)
        self.candidates = [f for f in self.factors if f.position in self.positions]
        self.costs: dict[str, int] | None = None  # importance=cost: factor_costs(); else 2 x weight elements

    # ------------------------------------------------------------------ sequential
    @property
    def per_stage_count(self) -> int:
        n = len(self.candidates)
        return max(1, math.ceil(self.per_stage * n)) if self.per_stage < 1 else int(self.per_stage)

    @property
    def final_count(self) -> int:
        return int(math.floor(self.final_fraction * len(self.candidates) + 1e-9))

    def stage_at(self, t: int) -> int:
        """Sequential: 0 before the first freeze, then one more every period."""
        if t < self.warmup:
            return 0
        return (t - self.warmup) // self.period + 1

    def n_frozen_at_stage(self, stage: int) -> int:
        return min(stage * self.per_stage_count, self.final_count)

    @property
    def n_stages(self) -> int:
        """Number of distinct sequential stages (including the all-trainable one)."""
        if self.final_count == 0:
            return 1
        return math.ceil(self.final_count / self.per_stage_count) + 1

    def static_order(self) -> list[Factor]:
        """Freeze order without measurements (depth / reverse_depth / size / cost; measured signals fall back to
        depth)."""
        if self.importance == "cost":  # the most weight-gradient FLOPs first: the most time saved per stage
            costs = self.costs or {}
            return sorted(self.candidates, key=lambda f: (-costs.get(f.key, 2 * f.numel), f.depth))
        if self.importance == "reverse_depth":
            return sorted(self.candidates, key=lambda f: -f.depth)
        if self.importance == "size":
            return sorted(self.candidates, key=lambda f: (-f.numel, f.depth))
        return sorted(self.candidates, key=lambda f: f.depth)

    # ------------------------------------------------------------------ all schedules
    def phase_at(self, t: int) -> int:
        if t < self.warmup:
            return -1
        return (t - self.warmup) // self.period % len(self.phases)

    def static_frozen(self) -> list[Factor]:
        if self.name == "first":
            return [f for f in self.factors if f.position == "first"]
        if self.name == "last":
            return [f for f in self.factors if f.position == "last"]
        if self.name == "largest":
            by_layer: dict[str, Factor] = {}
            for f in self.factors:
                if f.layer not in by_layer or f.numel > by_layer[f.layer].numel:
                    by_layer[f.layer] = f
            return list(by_layer.values())
        return []

    def state_key(self, t: int) -> int:
        """Changes exactly when the frozen set may change."""
        if self.name == "sequential":
            return self.n_frozen_at_stage(self.stage_at(t))
        if self.name == "alternating":
            return self.phase_at(t)
        return 0

    def frozen_at(self, t: int, order: Sequence[Factor] | None = None,
                  already: Iterable[Factor] = ()) -> list[Factor]:
        """The factors frozen at ``t``. Sequential keeps ``already`` frozen and adds from ``order``."""
        if self.name == "none":
            return []
        if self.name in ("first", "last", "largest"):
            return self.static_frozen()
        if self.name == "alternating":
            phase = self.phase_at(t)
            if phase < 0:
                return []
            return [f for f in self.factors if f.position not in self.phases[phase]]
        n = self.n_frozen_at_stage(self.stage_at(t))
        frozen = list(already)[:n]
        keys = {f.key for f in frozen}
        for f in order if order is not None else self.static_order():
            if len(frozen) >= n:
                break
            if f.key not in keys:
                frozen.append(f)
                keys.add(f.key)
        return frozen

    def timeline(self, total: int) -> list[tuple[int, int, list[Factor]]]:
        """(start, length, frozen factors) of each distinct state over ``total`` units, static order.

        The benchmark measures every state and weights it by its length (time-weighted average).
        """
        segments: list[tuple[int, int, list[Factor]]] = []
        frozen: list[Factor] = []
        key = None
        for t in range(max(total, 1)):
            k = self.state_key(t)
            if k != key:
                frozen = self.frozen_at(t, already=frozen if self.name == "sequential" else ())
                segments.append((t, 0, list(frozen)))
                key = k
            s, length, fz = segments[-1]
            segments[-1] = (s, length + 1, fz)
        return segments


def validate_freeze(schedule: FreezeSchedule) -> None:
    if schedule.unit not in ("epoch", "step"):
        raise ValueError(f"freeze.unit={schedule.unit!r} is not allowed: choose one of epoch, step")
    if schedule.period <= 0:
        raise ValueError(f"freeze.period={schedule.period} is not allowed: it must be an integer >= 1")
    if schedule.warmup < 0:
        raise ValueError(f"freeze.warmup={schedule.warmup} is not allowed: it must be an integer >= 0")
    if not schedule.per_stage > 0:
        raise ValueError(f"freeze.per_stage={schedule.per_stage} is not allowed: a count >= 1 or a fraction in (0, 1)")
    if not 0 <= schedule.final_fraction <= 1:
        raise ValueError(f"freeze.final_fraction={schedule.final_fraction} is not allowed: it must be in [0, 1]")
    if schedule.importance not in IMPORTANCES:
        raise ValueError(f"freeze.importance={schedule.importance!r} is not allowed: choose one of {', '.join(IMPORTANCES)}")
    for p in schedule.positions + [p for phase in schedule.phases for p in phase]:
        if p not in POSITIONS:
            raise ValueError(f"freeze position {p!r} is not allowed (freeze.positions / freeze.phases): "
                             f"choose from {', '.join(POSITIONS)}")
    if not schedule.phases or not all(schedule.phases):
        raise ValueError(f"freeze.phases={schedule.phases} is not allowed: give a non-empty list of non-empty position lists")


def set_frozen(factors: Sequence[Factor], frozen: Iterable[Factor], with_bias: bool = False) -> None:
    """Apply a frozen set: frozen weights lose requires_grad and their stale gradient; the rest train."""
    frozen_keys = {f.key for f in frozen}
    for f in factors:
        freeze = f.key in frozen_keys
        for p in f.parameters(with_bias):
            p.requires_grad_(not freeze)
            if freeze:
                p.grad = None
        if not with_bias and getattr(f.module, "bias", None) is not None:
            f.module.bias.requires_grad_(True)


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)


class FreezingCallback(pl.Callback):
    """Applies a :class:`FreezeSchedule` to ``pl_module.model`` during fit and logs each stage.

    Measured importance (``weight_change`` / ``grad_norm``) is the relative change of a factor since the last
    stage: the factors that moved least are frozen first.
    """

    def __init__(self, cfg: Any, *, log_flops: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.log_flops = log_flops
        self.schedule: FreezeSchedule | None = None
        self.frozen: list[Factor] = []
        self.history: list[dict[str, Any]] = []
        self._key: Any = None
        self._snapshot: dict[str, torch.Tensor] = {}
        self._grad_sq: dict[str, float] = {}

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, "model", pl_module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.schedule is None:
            self.schedule = FreezeSchedule(self.cfg, collect_factors(self._model(pl_module)))

    def _t(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.schedule.unit == "step" else trainer.current_epoch

    def _importance_order(self) -> list[Factor]:
        s = self.schedule
        if s.importance not in MEASURED or not self._snapshot:
            return s.static_order()
        scores = {}
        for f in s.candidates:
            w = f.module.weight.detach()
            if s.importance == "weight_change":
                ref = self._snapshot[f.key]
                scores[f.key] = ((w.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            else:
                scores[f.key] = math.sqrt(self._grad_sq.get(f.key, 0.0)) / max(w.float().norm().item(), 1e-12)
        return sorted(s.candidates, key=lambda f: (scores[f.key], f.depth))

    def _take_snapshot(self) -> None:
        if self.schedule.importance == "weight_change":
            self._snapshot = {f.key: f.module.weight.detach().float().clone() for f in self.schedule.candidates}
        else:
            self._snapshot = {f.key: torch.empty(0) for f in self.schedule.candidates}
        self._grad_sq = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_snapshot()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        s = self.schedule
        t = self._t(trainer)
        key = s.state_key(t)
        if key == self._key:
            return
        if s.name == "sequential" and s.importance == "cost" and s.costs is None:
            s.costs = self._measure_costs(pl_module, batch)
        order = self._importance_order() if s.name == "sequential" else None
        self.frozen = self._agree(trainer, s.frozen_at(t, order=order,
                                                      already=self.frozen if s.name == "sequential" else ()))
        set_frozen(s.factors, self.frozen, s.freeze_bias)
        self._key = key
        self._take_snapshot()
        self._log_stage(trainer, pl_module, t, batch)

    def _measure_costs(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, int]:
        """importance=cost on this run's input (a tensor, or the first item of an (input, target) batch)."""
        return measure_factor_costs(self._model(pl_module), batch[0] if isinstance(batch, (list, tuple)) else batch)

    def _agree(self, trainer: pl.Trainer, frozen: list[Factor]) -> list[Factor]:
        """Rank 0's frozen set on every rank (DDP): all replicas freeze, and re-wrap, identically."""
        from lrd_exp.distributed import broadcast_keys

        by_key = {f.key: f for f in self.schedule.factors}
        return [by_key[k] for k in broadcast_keys(trainer, [f.key for f in frozen])]

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.importance != "grad_norm":
            return
        for f in self.schedule.candidates:
            g = f.module.weight.grad
            if g is not None:
                self._grad_sq[f.key] = self._grad_sq.get(f.key, 0.0) + float(g.detach().float().pow(2).sum())

    def _log_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int, batch: Any) -> None:
        model = self._model(pl_module)
        info: dict[str, Any] = {
            "t": t, "unit": self.schedule.unit, "global_step": trainer.global_step,
            "n_frozen": len(self.frozen), "n_factors": len(self.schedule.factors),
            "trainable_fraction": trainable_fraction(model),
            "frozen": [f.key for f in self.frozen],
        }
        if self.log_flops and isinstance(batch, (list, tuple)) and torch.is_tensor(batch[0]):
            from lrd_exp.bench import count_flops

            x, y = batch[0], batch[1]
            try:
                # two samples, not one: BatchNorm in train mode needs more than one value per channel
                # (ResNet's last stage is 1x1 at 32 px); FLOPs scale linearly with the batch
                n = min(2, x.shape[0])
                info["train_flops_per_step"] = count_flops(model, x[:n], y=y[:n], train=True) * x.shape[0] // n
            except Exception as exc:  # counting must never break training
                info["train_flops_error"] = repr(exc)
        self.history.append(info)
        metrics = {"freeze/n_frozen": float(info["n_frozen"]), "freeze/trainable_fraction": info["trainable_fraction"]}
        if "train_flops_per_step" in info:
            metrics["freeze/train_gflops_per_step"] = info["train_flops_per_step"] / 1e9
        if trainer.loggers:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        if trainer.is_global_zero:
            log.info(
                f"[freeze] {self.schedule.name} @ {self.schedule.unit} {t}: {info['n_frozen']}/{info['n_factors']} "
                f"factors frozen, {info['trainable_fraction']:.1%} of parameters trainable"
                + (f", {info['train_flops_per_step'] / 1e9:.3f} GFLOP/step" if "train_flops_per_step" in info else ""))

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": [f.key for f in self.frozen], "key": self._key, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pending = getattr(self, "_pending", None)
        if pending and self.schedule is not None:
            by_key = {f.key: f for f in self.schedule.factors}
            self.frozen = [by_key[k] for k in pending["frozen"] if k in by_key]
            self._key = pending["key"]
            self.history = pending.get("history", [])
            set_frozen(self.schedule.factors, self.frozen, self.schedule.freeze_bias)
            self._pending = None
