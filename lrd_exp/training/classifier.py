"""The LightningModule: an image classifier around any ``nn.Module`` (timm model, original or decomposed)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lrd_exp.config.schema import LR_SCHEDULES, OPTIMIZERS


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss: the run stops and its row is marked failed."""


def make_optimizer(params: list[torch.nn.Parameter], optim: Any) -> torch.optim.Optimizer:
    """The optimizer a ``trainer.*_optim`` node names; the benchmark builds the same one, so both time alike."""
    optim = optim or {}
    name = optim.get("name", "sgd")
    lr = float(optim.get("lr", 0.05))
    wd = float(optim.get("weight_decay", 0.0))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(optim.get("momentum", 0.9)), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise ValueError(f"trainer.*_optim.name={name!r} is not allowed: choose one of {', '.join(OPTIMIZERS)}")


class Classifier(pl.LightningModule):
    """Cross-entropy training with SGD/AdamW and an optional cosine schedule.

    All parameters go to the optimizer; a frozen one (requires_grad False, grad None) is skipped by it, so
    the freezing callback can change the frozen set at any step without rebuilding the optimizer.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, optim: Any = None, max_steps: int | None = None,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.model = model
        self.channels_last = bool(channels_last)
        self.optim = dict(optim or {})
        self.max_steps = max_steps
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.curve: list[dict[str, float]] = []
        # the running training loss of the current epoch, summed on the device (no sync per step): validation
        # runs before Lightning aggregates `train/loss_epoch`, so the curve cannot read that metric
        self._loss_sum: torch.Tensor | None = None
        self._loss_n = 0

    def setup(self, stage: str) -> None:
        # before the optimizer is built; `.to(memory_format=...)` keeps the Parameter objects
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:  # (a batch hook would warn with every LightningDataModule)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=float(self.optim.get("label_smoothing", 0.0)))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}: lower the learning rate "
                f"(trainer.*_optim.lr={self.optim.get('lr')}) or enable gradient clipping")
        self.train_acc(logits.detach(), y)
        weighted = loss.detach() * x.shape[0]
        self._loss_sum = weighted if self._loss_sum is None else self._loss_sum + weighted
        self._loss_n += x.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_acc(logits, y)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True, batch_size=x.shape[0])

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_n = None, 0

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.trainer.callback_metrics
        train_loss = float(self._loss_sum / self._loss_n) if self._loss_sum is not None and self._loss_n else math.nan
        self.curve.append({
            "epoch": self.current_epoch, "step": self.global_step,
            "val_top1": 100.0 * float(metrics.get("val/acc", math.nan)),
            "val_loss": float(metrics.get("val/loss", math.nan)),
            "train_loss": train_loss,  # mean of this epoch's steps so far
        })

    def configure_optimizers(self) -> Any:
        opt = make_optimizer(list(self.model.parameters()), self.optim)
        schedule = self.optim.get("scheduler", "cosine")
        warmup_epochs = float(self.optim.get("warmup_epochs", 0.0) or 0.0)
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"trainer.*_optim.scheduler={schedule!r} is not allowed: choose one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if warmup_epochs < 0:
            raise ValueError(f"trainer.*_optim.warmup_epochs={warmup_epochs} is not allowed: must be >= 0")
        if schedule == "none" and warmup_epochs == 0:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if self.max_steps and self.max_steps > 0:
            total = min(total, self.max_steps)
        total = max(total, 1)
        per_epoch = self.trainer.estimated_stepping_batches / max(self.trainer.max_epochs or 1, 1)
        warmup = min(int(round(warmup_epochs * per_epoch)), total - 1) if warmup_epochs > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(warmup, total, cosine=schedule == "cosine"))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _warmup_cosine(warmup: int, total: int, *, cosine: bool = True):
    """LR factor per step: linear from 1/warmup to 1 over ``warmup`` steps, then cosine to 0 (or constant)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
