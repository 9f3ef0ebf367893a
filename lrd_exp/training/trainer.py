"""The Lightning Trainer of a job: devices, precision, DDP, checkpoints and loggers; fit and evaluate with it.

Each function takes the config nodes it reads (``trainer``, ``device``: the placement, ``logger``), never the whole
config; ``device`` (a :class:`DeviceInfo`) is the accelerator it resolved to."""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import nn

from lrd_exp.config.schema import DeviceConfig, LoggerConfig, TrainerConfig, WandbConfig
from lrd_exp.config.values import canonical_precision
from lrd_exp.config.values import enum_value as _v
from lrd_exp.devices.npu import trainer_device_kwargs
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.distributed.ddp import ddp_strategy
from lrd_exp.training.classifier import Classifier

log = logging.getLogger("lrd_exp")


def make_trainer(t: TrainerConfig, placement: DeviceConfig, device: DeviceInfo, *, epochs: int, out_dir: str,
                 stage: str, callbacks: list[pl.Callback] | None = None, loggers: list[Any] | None = None,
                 checkpoint: bool = False) -> pl.Trainer:
    """A Lightning Trainer with the ``trainer`` node ``t``'s settings on ``placement`` (the ``device`` node)."""
    cbs = list(callbacks or [])
    if checkpoint:
        cbs.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out_dir, "checkpoints", stage),
                                                save_last=True, save_top_k=0, every_n_epochs=1))
    devices, num_nodes = placement.devices, placement.num_nodes
    if stage == "eval":  # one device: exact top-1 (a DistributedSampler pads with repeats), no worker start-up
        devices, num_nodes, strategy = 1, 1, "auto"
    else:  # several devices: DDP in spawned workers, re-wrapped at each freeze stage (lrd_exp.distributed)
        strategy = ddp_strategy(device, devices, placement.strategy, num_nodes=num_nodes)
    kwargs = trainer_device_kwargs(device, devices, canonical_precision(t.precision), strategy)
    if kwargs.get("plugins") is None:
        kwargs.pop("plugins", None)
    # a step cap spreads over the epochs, so smoke runs still validate, log curves and change freeze stages
    limit_train = max(1, -(-t.max_steps // max(epochs, 1))) if t.max_steps > 0 else 1.0
    return pl.Trainer(
        max_epochs=epochs, max_steps=t.max_steps if t.max_steps > 0 else -1, limit_train_batches=limit_train,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, enable_model_summary=False,
        enable_checkpointing=checkpoint, logger=loggers if loggers else False, callbacks=cbs,
        num_nodes=num_nodes, default_root_dir=out_dir, num_sanity_val_steps=0, **kwargs)


def evaluate(t: TrainerConfig, placement: DeviceConfig, device: DeviceInfo, model: nn.Module,
             dm: pl.LightningDataModule, out_dir: str) -> float:
    """Top-1 (%) of ``model`` on ``dm``'s validation split (``t.limit_val_batches`` of it), on one device."""
    trainer = make_trainer(t, placement, device, epochs=1, out_dir=out_dir, stage="eval")
    module = Classifier(model, dm.num_classes, channels_last=t.channels_last)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)
    return 100.0 * float(metrics[0]["val/acc"])


def validation_images(dm: pl.LightningDataModule, limit: float | int) -> int:
    """How many validation images a top-1 rests on (``limit``: ``trainer.limit_val_batches``, as Lightning applies
    it): one image is worth 100 / that many points, the resolution of every accuracy in the row."""
    dm.setup("validate")
    n = len(dm.val_dataloader().dataset)
    batch = dm.batch_size
    batches = math.ceil(n / batch)
    if isinstance(limit, float) and limit <= 1.0:
        batches = batches if limit == 1.0 else max(int(batches * limit), 1)
    else:
        batches = min(int(limit), batches)
    return min(n, batches * batch)


def fit(t: TrainerConfig, placement: DeviceConfig, device: DeviceInfo, model: nn.Module, dm: pl.LightningDataModule,
        *, epochs: int, optim: Any, out_dir: str, stage: str, callbacks: list[pl.Callback] | None = None,
        loggers: list[Any] | None = None, resume: bool = False, teacher: nn.Module | None = None,
        bn: str = "train") -> Classifier:
    """Train ``model`` in place for ``epochs``; with a ``teacher``, distilled from it (``trainer.distill``'s alpha and
    temperature; the teacher is set to eval, no grad, and moved to the device: pass a copy you may give away);
    ``bn="eval"`` keeps BatchNorm's running statistics as they are (:class:`Classifier`)."""
    kd = t.get("distill") or {}
    if OmegaConf.is_config(optim):
        optim = OmegaConf.to_container(optim, resolve=True, enum_to_str=True)
    module = Classifier(model, dm.num_classes, optim=optim,
                        max_steps=t.max_steps, channels_last=t.channels_last, teacher=teacher,
                        distill_alpha=kd.get("alpha", 0.5), distill_temperature=kd.get("temperature", 2.0), bn=bn)
    trainer = make_trainer(t, placement, device, epochs=epochs, out_dir=out_dir, stage=stage, callbacks=callbacks,
                           loggers=loggers, checkpoint=True)
    ckpt = os.path.join(out_dir, "checkpoints", stage, "last.ckpt")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt if resume and os.path.isfile(ckpt) else None)
    if resume and os.path.isfile(ckpt):
        log.info("resumed %s from %s", stage, ckpt)
    return module


def make_loggers(logger: LoggerConfig, out_dir: str, stage: str) -> list[Any]:
    """The ``logger`` node's loggers of one training stage (a CSV log of its own)."""
    loggers: list[Any] = []
    if logger.csv:
        version = stage
        if os.path.isdir(os.path.join(out_dir, "csv", stage)):  # a resumed or repeated run keeps the old logs
            version = f"{stage}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        loggers.append(CSVLogger(save_dir=out_dir, name="csv", version=version))
    return loggers


def make_wandb(w: WandbConfig, out_dir: str, row: dict[str, Any], *, job_type: str,
               config: dict[str, Any]) -> Any | None:
    """The W&B logger of the ``logger.wandb`` node ``w`` (None when off) for the job of ``row``; ``config``: the
    run's whole config, logged with it."""
    mode = _v(w.mode)
    if not w.enabled or mode == "disabled":
        return None
    sweep = os.path.basename(os.path.dirname(out_dir)) if "multirun" in out_dir else "single"
    return WandbLogger(project=w.project, entity=w.entity, save_dir=out_dir, offline=mode == "offline",
                       group=sweep, job_type=job_type, tags=list(w.tags),
                       name=f"{row['model']}-{row['rank_policy']}-{row['freeze']}",
                       config=config)


def finish_wandb(wandb_logger: Any, row: dict[str, Any]) -> None:
    import wandb

    try:
        run = wandb_logger.experiment
        for key, value in row.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                run.summary[key] = value
    finally:
        wandb.finish()
