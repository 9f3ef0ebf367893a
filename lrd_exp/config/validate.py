"""Fail fast on bad input: one line naming the key, the bad value and what is allowed, before any work."""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import MISSING, Field, fields
from typing import TYPE_CHECKING, Any

from lrd_exp.config.rank_settings import RankSettings
from lrd_exp.config.schema import FreezeConfig
from lrd_exp.config.values import (
    LR_SCHEDULES,
    OPTIMIZERS,
    canonical_precision,
    check_calibrated,
    check_choice,
    check_count,
    check_dataset,
    check_freeze,
    check_preprocessing,
)
from lrd_exp.config.values import enum_value as _v

if TYPE_CHECKING:
    from omegaconf import DictConfig

DIGITS_IMAGES = 1797  # scikit-learn's digits; the validation split takes ceil(val_fraction * 1797)


class ConfigError(ValueError):
    """A user error in the configuration: printed as one line, no traceback."""


def _field_default(f: Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]


#: What a ``freeze`` mapping that leaves a key out means: the schema's defaults (``FreezeConfig``), the one source.
FREEZE_DEFAULTS: dict[str, Any] = {f.name: _v(_field_default(f)) for f in fields(FreezeConfig)}


def freeze_values(node: Any) -> dict[str, Any]:
    """A ``freeze`` node (DictConfig, mapping or object) as plain values; missing keys take FREEZE_DEFAULTS."""
    out = {}
    for key, default in FREEZE_DEFAULTS.items():
        value = node.get(key, None) if hasattr(node, "get") else getattr(node, key, None)
        out[key] = _v(default if value is None else value)
    out["warmup"], out["period"] = int(out["warmup"]), int(out["period"])
    out["per_stage"], out["final_fraction"] = float(out["per_stage"]), float(out["final_fraction"])
    out["positions"] = [str(p) for p in out["positions"]]
    out["phases"] = [[str(p) for p in phase] for phase in out["phases"]]
    out["freeze_bias"] = bool(out["freeze_bias"])
    return out


def check_model_name(name: str) -> None:
    import timm  # here, not at the top: `run.py --help` loads this module

    if name in timm.list_models() or name in timm.list_pretrained():  # an architecture, or one with its weights' tag
        return
    close = difflib.get_close_matches(name, timm.list_models() + timm.list_pretrained(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"model.name={name!r} is not a timm model{hint}")


def validate(cfg: DictConfig) -> None:
    """Range checks the typed schema cannot express. Raises :class:`ConfigError`."""
    try:
        _validate(cfg)
    except ConfigError:
        raise
    except ValueError as exc:  # the library's own checks already name key, value and the allowed range
        raise ConfigError(str(exc)) from None


def validate_rank_freeze(cfg: DictConfig) -> None:
    """The checks of ``rank`` and ``freeze``: what defines one decomposed configuration (the library's own)."""
    RankSettings.from_keys(**cfg.rank)
    check_freeze(**freeze_values(cfg.freeze))


def _validate(cfg: DictConfig) -> None:
    validate_rank_freeze(cfg)
    _check_trainer(cfg.trainer)
    _check_bench(cfg.bench)
    _check_advise(cfg.advise)
    _check_precisions(cfg)
    _check_dataset(cfg.dataset)
    _check_calibration_images(cfg)
    _check_allocation_data(cfg)
    _check_data_root(cfg)
    _check_model(cfg)
    _check_device(cfg.device)


def _check_device(d: Any) -> None:
    """``device.devices``: a count (-1: all), "auto", or device indices ("0,1" or [0, 1]); ``device.num_nodes``."""
    devices = d.devices
    allowed = 'a count >= 1, -1 (all), "auto", or device indices such as "0,1" or [0, 1]'
    if isinstance(devices, str):
        text = devices.strip()
        ok = text in ("auto", "-1") or all(part.strip().isdigit() for part in text.rstrip(",").split(","))
    elif isinstance(devices, (list, tuple)) or hasattr(devices, "__len__"):
        ok = len(devices) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in devices)
    else:
        ok = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    if not ok:
        raise ConfigError(f"device.devices={devices!r} is not allowed: {allowed}")
    check_count("device.num_nodes", d.num_nodes, "a number of nodes")


def _check_trainer(t: DictConfig) -> None:
    for key in ("baseline_epochs", "finetune_epochs"):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}={t[key]} is not allowed: epochs must be >= 0")
    if t.batch_size <= 0:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is not allowed: it must be an integer >= 1")
    for key in ("baseline_optim", "finetune_optim"):
        _check_optim(f"trainer.{key}", t[key])
    drop = t.get("target_drop")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not drop >= 0):
        raise ConfigError(f"trainer.target_drop={drop!r} is not allowed: null (every epoch) or points of top-1 >= 0")
    kd = t.get("distill") or {}
    if not 0 <= kd.get("alpha", 0.5) <= 1:
        raise ConfigError(f"trainer.distill.alpha={kd.get('alpha')} is not allowed: the distillation weight is "
                          "in [0, 1]")
    if not kd.get("temperature", 2.0) > 0:
        raise ConfigError(f"trainer.distill.temperature={kd.get('temperature')} is not allowed: a temperature > 0")
    if t.get("calibrated") is not None:
        check_calibrated(**t.calibrated)


def _check_optim(key: str, o: DictConfig) -> None:
    check_choice(f"{key}.name", o.name, OPTIMIZERS)
    check_choice(f"{key}.scheduler", o.scheduler, LR_SCHEDULES)
    if not o.lr > 0:
        raise ConfigError(f"{key}.lr={o.lr} is not allowed: a learning rate > 0")
    if o.warmup_epochs < 0:
        raise ConfigError(f"{key}.warmup_epochs={o.warmup_epochs} is not allowed: epochs >= 0")


def _check_bench(b: DictConfig) -> None:
    if b.batch_size is not None and b.batch_size <= 0:
        raise ConfigError(f"bench.batch_size={b.batch_size} is not allowed: null or an integer >= 1")
    if b.rounds is not None and b.rounds < 1:
        raise ConfigError(f"bench.rounds={b.rounds} is not allowed: null (one per step) or an integer >= 1")
    if b.switch_warmup < 0:
        raise ConfigError(f"bench.switch_warmup={b.switch_warmup} is not allowed: an integer >= 0")
    if b.probe_steps < 0:
        raise ConfigError(f"bench.probe_steps={b.probe_steps} is not allowed: 0 (off) or an integer >= 1")
    if b.min_time_s < 0:
        raise ConfigError(f"bench.min_time_s={b.min_time_s} is not allowed: seconds >= 0")
    if b.steps < 1 or b.warmup < 0:
        raise ConfigError(f"bench.steps={b.steps} / bench.warmup={b.warmup} are not allowed: "
                          "steps >= 1, warmup >= 0")


def _check_advise(a: DictConfig) -> None:
    if a.steps < 1 or a.warmup < 0:
        raise ConfigError(f"advise.steps={a.steps} / advise.warmup={a.warmup} are not allowed: steps >= 1, warmup >= 0")
    if a.val_images < 0:
        raise ConfigError(f"advise.val_images={a.val_images} is not allowed: 0 (no top-1) or a number of images")
    if a.max_error is not None and not a.max_error > 0:
        raise ConfigError(f"advise.max_error={a.max_error} is not allowed: null (the frontier's knee) or an error > 0")


def _check_precisions(cfg: DictConfig) -> None:
    for key, value in (("trainer.precision", cfg.trainer.precision), ("bench.precision", cfg.bench.precision)):
        if value is not None:
            try:
                canonical_precision(value)
            except ValueError as exc:
                raise ConfigError(f"{key}{str(exc).removeprefix('precision')}") from None


def _check_dataset(d: DictConfig) -> None:
    check_dataset(name=d.name, in_chans=d.in_chans, num_classes=d.num_classes, val_fraction=d.val_fraction)
    # the input pipeline's keys (the model's where null); CIFAR and ImageNet folders are RGB
    check_preprocessing(image_size=d.image_size, mean=d.mean, std=d.std, crop_pct=d.crop_pct,
                        crop_mode=d.crop_mode, interpolation=d.interpolation,
                        channels=3 if d.name in ("cifar10", "cifar100", "imagenet") else d.in_chans)


def _check_allocation_data(cfg: DictConfig) -> None:
    """``rank.allocation`` global / fastest measures each layer's damage on real calibration images: synthetic data
    has none that mean anything (a training job stops here, before any work)."""
    if _v(cfg.rank.allocation) != "uniform" and cfg.dataset.name == "synthetic" and _v(cfg.task) == "train":
        raise ConfigError(f"rank.allocation={_v(cfg.rank.allocation)} is not allowed with dataset=synthetic: it "
                          "measures each layer's damage on real calibration images; use rank.allocation=uniform")


def _check_calibration_images(cfg: DictConfig) -> None:
    """The images calibration takes fit the training split (synthetic ones only when asked: rank.fit=auto fits the
    weights there); other datasets are checked when their split is read, before the baseline."""
    d = cfg.dataset
    train_split = {"digits": DIGITS_IMAGES - math.ceil(DIGITS_IMAGES * d.val_fraction),
                   "synthetic": d.train_size if _v(cfg.rank.fit) == "activations" else None}.get(d.name)
    if train_split is not None and cfg.rank.calibration_images > train_split and _v(cfg.task) in ("train", "advise"):
        raise ConfigError(f"rank.calibration_images={cfg.rank.calibration_images} is not allowed here: between 1 "
                          f"and the training split's {train_split} images (dataset={d.name})")


def _check_data_root(cfg: DictConfig) -> None:
    """A dataset read from disk is there before any work (a job that needs it: train, evaluate)."""
    d = cfg.dataset
    if _v(cfg.task) not in ("train", "evaluate") or d.name not in ("imagenet", "cifar10", "cifar100"):
        return
    root = d.root or os.path.join(cfg.paths.data_dir, d.name)
    if os.path.isdir(root):
        return
    if d.name == "imagenet":
        raise ConfigError(f"dataset.root={root!r} does not exist: point it at an ImageFolder with train/ and val/")
    if not d.download:
        raise ConfigError(f"dataset.root={root!r} does not exist: set dataset.download=true or point "
                          "dataset.root at the extracted CIFAR batches")


def _check_model(cfg: DictConfig) -> None:
    check_model_name(cfg.model.name)
    if cfg.model.checkpoint is None and _v(cfg.task) == "evaluate":
        raise ConfigError("model.checkpoint=None is not allowed with task=evaluate: give the model file to evaluate "
                          "(a job's model.pt, a state_dict or a Lightning .ckpt)")
    # the checkpoint's contents are read where models are loaded: lrd_exp.tasks.checkpoint, at the job's start
