"""The LightningModule: an image classifier around any ``nn.Module`` (timm model, original or decomposed)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lrd_exp.config.values import BN_MODES, LR_SCHEDULES, OPTIMIZERS, check_choice

#: the BatchNorm layers ``bn="eval"`` keeps in eval mode
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinton's knowledge-distillation loss and its KD term: ``((1 - alpha) * CE + alpha * T^2 * KD, KD)`` with
    ``KD = KL(softmax(teacher / T) || softmax(student / T))`` averaged over the batch (the T^2 keeps the soft
    term's gradients on the scale of the hard one's)."""
    t = float(temperature)
    ce = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    kd = F.kl_div(F.log_softmax(logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * t * t * kd, kd


class Classifier(pl.LightningModule):
    """Cross-entropy training with SGD/AdamW and an optional cosine schedule.

    All parameters go to the optimizer; a frozen one (requires_grad False, grad None) is skipped by it, so
    the freezing callback can change the frozen set at any step without rebuilding the optimizer.

    With a ``teacher`` (the original model, when fine-tuning the decomposed one with ``trainer.distill``), the
    training loss is :func:`distillation_loss` with ``distill_alpha`` and ``distill_temperature``; validation is
    plain cross-entropy. The teacher is used as given, not copied: it is put in eval mode with
    ``requires_grad=False``, moved to the student's device and floating dtype (and layout, under
    ``channels_last``) at fit start, and is not a submodule: not in the optimizer, ``state_dict`` or checkpoints.

    ``bn="eval"`` keeps every BatchNorm layer in eval mode whenever the module trains: it normalizes with, and
    keeps, the running statistics it was given (a calibrated start's; lrd_exp.training.recipe); its affine
    parameters still train.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, optim: Any = None, max_steps: int | None = None,
                 channels_last: bool = False, teacher: nn.Module | None = None, distill_alpha: float = 0.5,
                 distill_temperature: float = 2.0, bn: str = "train") -> None:
        super().__init__()
        self.bn = check_choice("bn", bn, BN_MODES)
        self.model = model
        # a tuple, not an attribute nn.Module would register: the teacher stays out of parameters(), state_dict()
        # and the checkpoints, and out of train() / to() of this module (on_fit_start moves it)
        self._teacher: tuple[nn.Module, ...] = () if teacher is None else (teacher.eval().requires_grad_(False),)
        self.distill_alpha = float(distill_alpha)
        self.distill_temperature = float(distill_temperature)
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

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            self.keep_bn_mode()
        return self

    def keep_bn_mode(self) -> None:
        """``bn="eval"``: every BatchNorm layer in eval mode. Lightning trains the model in the mode it is given
        (it calls no ``train()``), so each epoch's start and every ``train()`` call come here."""
        if self.bn == "eval":
            for m in self.model.modules():
                if isinstance(m, BATCHNORMS):
                    m.eval()

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def on_fit_start(self) -> None:
        # after the strategy moved (and, for a *-true precision, cast) the student: the teacher follows it
        teacher = self.teacher
        if teacher is None:
            return
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        teacher.to(device=self.device, dtype=dtype)
        if self.channels_last:
            teacher.to(memory_format=torch.channels_last)
        teacher.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:  # (a batch hook would warn with every LightningDataModule)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self(x)
        smoothing = float(self.optim.get("label_smoothing", 0.0))
        teacher = self.teacher
        if teacher is None:
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        else:
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss, kd = distillation_loss(logits, teacher_logits, y, alpha=self.distill_alpha,
                                         temperature=self.distill_temperature, label_smoothing=smoothing)
            self.log("train/kd", kd.detach(), on_step=False, on_epoch=True, batch_size=x.shape[0])
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
        self.keep_bn_mode()

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
