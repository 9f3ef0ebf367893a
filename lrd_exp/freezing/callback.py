"""The Lightning callback that applies a freeze schedule during fine-tuning (and agrees on it under DDP)."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lrd_exp.config.values import MEASURED_IMPORTANCES as MEASURED
from lrd_exp.freezing.factors import (
    Factor,
    collect_factors,
    measure_factor_costs,
    trainable_fraction,
)
from lrd_exp.freezing.schedule import FreezeSchedule
from lrd_exp.timing.flops import count_flops

log = logging.getLogger("lrd_exp")


def broadcast_keys(trainer: pl.Trainer, keys: list[str]) -> list[str]:
    """Rank 0's list on every rank (identity on one device): every rank freezes the same factors."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or getattr(strategy, "world_size", 1) <= 1:
        return keys
    return list(strategy.broadcast(list(keys), src=0))


def forked_rng(model: nn.Module) -> contextlib.AbstractContextManager:
    """The random state of the CPU and the model's accelerator, restored on exit: a measurement inside a run
    (dropout, drop-path) must not draw from the run's stream, or measuring would change the training."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type in ("cuda", "npu"):
        return torch.random.fork_rng(devices=[dev.index if dev.index is not None else 0], device_type=dev.type)
    return torch.random.fork_rng(devices=[])


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
        if s.kind == "sequential" and s.importance == "cost" and s.costs is None:
            s.costs = self._measure_costs(pl_module, batch)
        order = self._importance_order() if s.kind == "sequential" else None
        self.frozen = self._agree(trainer, s.frozen_at(t, order=order,
                                                      already=self.frozen if s.kind == "sequential" else ()))
        s.apply(self.frozen)
        self._key = key
        self._take_snapshot()
        self._log_stage(trainer, pl_module, t, batch)

    def _measure_costs(self, pl_module: pl.LightningModule, batch: Any) -> dict[str, int]:
        """importance=cost on this run's input (a tensor, or the first item of an (input, target) batch)."""
        model = self._model(pl_module)
        with forked_rng(model):  # an eval forward draws nothing today; a model's own sampling would
            return measure_factor_costs(model, batch[0] if isinstance(batch, (list, tuple)) else batch)

    def _agree(self, trainer: pl.Trainer, frozen: list[Factor]) -> list[Factor]:
        """Rank 0's frozen set on every rank (DDP): all replicas freeze, and re-wrap, identically."""
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
            x, y = batch[0], batch[1]
            try:
                # two samples, not one: BatchNorm in train mode needs more than one value per channel
                # (ResNet's last stage is 1x1 at 32 px); FLOPs scale linearly with the batch
                n = min(2, x.shape[0])
                with forked_rng(model):  # dropout in the counted training forward
                    flops = count_flops(model, x[:n], y=y[:n], train=True)
                info["train_flops_per_step"] = flops * x.shape[0] // n
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
                f"[freeze] {self.schedule.kind} @ {self.schedule.unit} {t}: {info['n_frozen']}/{info['n_factors']} "
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
            self.schedule.apply(self.frozen)
            self._pending = None
