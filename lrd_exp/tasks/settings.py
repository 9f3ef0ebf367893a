"""The measuring settings a job resolves from its config: each ``bench.*`` key, or the training loop's when it is
null (the benchmark then times what training runs), and how long a freeze schedule lasts."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrd_exp.config.schema import canonical_precision
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.timing.compare import CompareSettings
from lrd_exp.training.classifier import make_optimizer


def bench_batch_size(cfg: DictConfig) -> int:
    """The benchmark's batch: ``bench.batch_size``, or the training loop's when that is null."""
    return cfg.bench.batch_size or cfg.trainer.batch_size


def bench_precision(cfg: DictConfig) -> str:
    """The benchmark's precision: ``bench.precision``, or the training loop's when that is null (long form)."""
    return canonical_precision(cfg.bench.precision if cfg.bench.precision is not None else cfg.trainer.precision)


def bench_channels_last(cfg: DictConfig) -> bool:
    """The benchmark's layout: ``bench.channels_last``, or the training loop's when that is null."""
    value = cfg.bench.channels_last
    return bool(cfg.trainer.channels_last if value is None else value)


def bench_optimizer(cfg: DictConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The fine-tuning loop's optimizer (SGD or AdamW, with its momentum and weight decay), for the benchmark."""
    optim = OmegaConf.to_container(cfg.trainer.finetune_optim, resolve=True, enum_to_str=True)
    return functools.partial(make_optimizer, optim=optim)


def bench_settings(cfg: DictConfig, device: DeviceInfo, desc: str = "timing") -> CompareSettings:
    """How the side-by-side comparison times, from ``bench.*`` (``desc``: the progress bar's label)."""
    b = cfg.bench
    return CompareSettings(warmup=b.warmup, steps=b.steps, rounds=b.rounds, precision=bench_precision(cfg),
                           channels_last=bench_channels_last(cfg), compile=b.compile, device=device,
                           min_time_s=b.min_time_s, switch_warmup=b.switch_warmup,
                           optimizer_factory=bench_optimizer(cfg), desc=desc, latency=b.latency, memory=b.memory)


def advise_settings(cfg: DictConfig, device: DeviceInfo, desc: str = "timing") -> CompareSettings:
    """The benchmark's settings with ``advise.warmup`` / ``advise.steps``, and no training FLOPs (advise ranks by
    measured speed)."""
    return dataclasses.replace(bench_settings(cfg, device, desc), warmup=cfg.advise.warmup, steps=cfg.advise.steps,
                               flops=False)


def freeze_total_units(cfg: DictConfig, steps_per_epoch: int | None = None) -> int:
    """How long the fine-tuning lasts in the freeze schedule's unit (``freeze.unit``: steps or epochs)."""
    t = cfg.trainer
    if _v(cfg.freeze.unit) == "step":
        if t.max_steps > 0:
            return t.max_steps
        return t.finetune_epochs * (steps_per_epoch or 1)
    return max(t.finetune_epochs, 1)
