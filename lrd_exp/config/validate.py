"""Fail fast on bad input: one line naming the key, the bad value and what is allowed, before any work."""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig

from lrd_exp.config.schema import (
    CALIBRATES,
    DATASETS,
    FACTOR_POSITIONS,
    FITS,
    IMPORTANCES,
    LR_SCHEDULES,
    OPTIMIZERS,
    ROUNDINGS,
    SCHEDULES,
    canonical_precision,
)
from lrd_exp.config.schema import enum_value as _v

DIGITS_IMAGES = 1797  # scikit-learn's digits; the validation split takes ceil(val_fraction * 1797)


class ConfigError(ValueError):
    """A user error in the configuration: printed as one line, no traceback."""


# ------------------------------------------------------------------------------ single values (also the library's)
def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 1:
        raise ValueError(f"rank.ratio={ratio!r} is not allowed: the compression ratio must be a number > 1")
    return float(ratio)


def check_energy(energy: float) -> float:
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy <= 1:
        raise ValueError(f"rank.energy={energy!r} is not allowed: the kept energy fraction must be in (0, 1]")
    return float(energy)


def check_multiple(multiple: int) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"rank.multiple={multiple!r} is not allowed: the quantization step must be an integer >= 1")
    return multiple


def check_rounding(rounding: str) -> str:
    rounding = _v(rounding)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rank.rounding={rounding!r} is not allowed: choose one of {', '.join(ROUNDINGS)}")
    return rounding


def check_rank(rank: int, key: str = "rank.rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{key}={rank!r} is not allowed: a rank must be an integer >= 1")
    return rank


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_window(window: float) -> float:
    if not _number(window) or not 0 <= window < 1:
        raise ValueError(f"rank.window={window!r} is not allowed: a fraction in [0, 1)")
    return float(window)


def check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"rank.step={step!r} is not allowed: an integer >= 1")
    return step


def check_tolerance(tolerance: float) -> float:
    if not _number(tolerance) or not 0 <= tolerance < 1:
        raise ValueError(f"rank.tolerance={tolerance!r} is not allowed: a fraction in [0, 1)")
    return float(tolerance)


def check_fit(fit: str, calibrate: str, calibration_images: int) -> tuple[str, str, int]:
    """``rank.fit``, ``rank.calibrate`` and ``rank.calibration_images``: one ValueError naming the key."""
    fit, calibrate = _v(fit), _v(calibrate)
    if fit not in FITS:
        raise ValueError(f"rank.fit={fit!r} is not allowed: choose one of {', '.join(FITS)}")
    if calibrate not in CALIBRATES:
        raise ValueError(f"rank.calibrate={calibrate!r} is not allowed: choose one of {', '.join(CALIBRATES)}")
    if isinstance(calibration_images, bool) or not isinstance(calibration_images, int) or calibration_images < 1:
        raise ValueError(f"rank.calibration_images={calibration_images!r} is not allowed: a number of training "
                         "images >= 1")
    return fit, calibrate, calibration_images


def check_freeze(*, schedule: str, unit: str, warmup: int, period: int, per_stage: float, final_fraction: float,
                 importance: str, positions: Sequence[str], phases: Sequence[Sequence[str]], **_: Any) -> None:
    """The ``freeze`` node's values, one ValueError naming the key, the value and what is allowed."""
    if schedule not in SCHEDULES:
        raise ValueError(f"freeze.schedule={schedule!r} is not allowed: choose one of {', '.join(SCHEDULES)}")
    if unit not in ("epoch", "step"):
        raise ValueError(f"freeze.unit={unit!r} is not allowed: choose one of epoch, step")
    if period <= 0:
        raise ValueError(f"freeze.period={period} is not allowed: it must be an integer >= 1")
    if warmup < 0:
        raise ValueError(f"freeze.warmup={warmup} is not allowed: it must be an integer >= 0")
    if not per_stage > 0:
        raise ValueError(f"freeze.per_stage={per_stage} is not allowed: a count >= 1 or a fraction in (0, 1)")
    if not 0 <= final_fraction <= 1:
        raise ValueError(f"freeze.final_fraction={final_fraction} is not allowed: it must be in [0, 1]")
    if importance not in IMPORTANCES:
        raise ValueError(f"freeze.importance={importance!r} is not allowed: choose one of {', '.join(IMPORTANCES)}")
    for p in list(positions) + [p for phase in phases for p in phase]:
        if p not in FACTOR_POSITIONS:
            raise ValueError(f"freeze position {p!r} is not allowed (freeze.positions / freeze.phases): "
                             f"choose from {', '.join(FACTOR_POSITIONS)}")
    if not phases or not all(phases):
        raise ValueError(f"freeze.phases={phases} is not allowed: give a non-empty list of non-empty position lists")


#: What a ``freeze`` mapping that leaves a key out means (the library's defaults; conf/freeze/*.yaml sets them all).
FREEZE_DEFAULTS: dict[str, Any] = {
    "schedule": "none", "unit": "epoch", "warmup": 0, "period": 1, "per_stage": 0.25, "final_fraction": 0.75,
    "importance": "weight_change", "positions": list(FACTOR_POSITIONS), "phases": [["last"], ["first", "core"]],
    "freeze_bias": False,
}


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

    if name in timm.list_models():
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
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
    """The checks of ``rank`` and ``freeze``: what defines one decomposed configuration."""
    rank = cfg.rank
    policy = _v(rank.policy)
    check_ratio(rank.ratio)  # every numeric key whatever the policy: a bad value is a typo, used or not
    check_energy(rank.energy)
    check_multiple(rank.multiple)
    check_fit(rank.fit, rank.calibrate, rank.calibration_images)
    if policy == "fixed":
        if rank.rank is None:
            raise ConfigError("rank.rank=None is not allowed with rank.policy=fixed: give an int or {pattern: int}")
        if not isinstance(rank.rank, (dict, DictConfig)):
            check_rank(rank.rank)
    check_window(rank.window)  # whatever the policy: a bad value is a typo whether it is used or not
    check_step(rank.step)
    check_tolerance(rank.tolerance)
    check_freeze(**freeze_values(cfg.freeze))


def _validate(cfg: DictConfig) -> None:
    validate_rank_freeze(cfg)
    t = cfg.trainer
    for key in ("baseline_epochs", "finetune_epochs"):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}={t[key]} is not allowed: epochs must be >= 0")
    if t.batch_size <= 0:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is not allowed: it must be an integer >= 1")
    if cfg.bench.batch_size is not None and cfg.bench.batch_size <= 0:
        raise ConfigError(f"bench.batch_size={cfg.bench.batch_size} is not allowed: null or an integer >= 1")
    if cfg.bench.rounds is not None and cfg.bench.rounds < 1:
        raise ConfigError(f"bench.rounds={cfg.bench.rounds} is not allowed: null (one per step) or an integer >= 1")
    if cfg.bench.switch_warmup < 0:
        raise ConfigError(f"bench.switch_warmup={cfg.bench.switch_warmup} is not allowed: an integer >= 0")
    if cfg.bench.probe_steps < 0:
        raise ConfigError(f"bench.probe_steps={cfg.bench.probe_steps} is not allowed: 0 (off) or an integer >= 1")
    if cfg.bench.min_time_s < 0:
        raise ConfigError(f"bench.min_time_s={cfg.bench.min_time_s} is not allowed: seconds >= 0")
    if cfg.bench.steps < 1 or cfg.bench.warmup < 0:
        raise ConfigError(f"bench.steps={cfg.bench.steps} / bench.warmup={cfg.bench.warmup} are not allowed: "
                          "steps >= 1, warmup >= 0")
    a = cfg.advise
    if a.steps < 1 or a.warmup < 0:
        raise ConfigError(f"advise.steps={a.steps} / advise.warmup={a.warmup} are not allowed: steps >= 1, warmup >= 0")
    if a.val_images < 0:
        raise ConfigError(f"advise.val_images={a.val_images} is not allowed: 0 (no top-1) or a number of images")
    if a.max_error is not None and not a.max_error > 0:
        raise ConfigError(f"advise.max_error={a.max_error} is not allowed: null (the frontier's knee) or an error > 0")
    for key in ("baseline_optim", "finetune_optim"):
        o = t[key]
        if o.name not in OPTIMIZERS:
            raise ConfigError(f"trainer.{key}.name={o.name!r} is not allowed: choose one of {', '.join(OPTIMIZERS)}")
        if o.scheduler not in LR_SCHEDULES:
            raise ConfigError(f"trainer.{key}.scheduler={o.scheduler!r} is not allowed: choose one of "
                              f"{', '.join(LR_SCHEDULES)}")
        if not o.lr > 0:
            raise ConfigError(f"trainer.{key}.lr={o.lr} is not allowed: a learning rate > 0")
        if o.warmup_epochs < 0:
            raise ConfigError(f"trainer.{key}.warmup_epochs={o.warmup_epochs} is not allowed: epochs >= 0")
    drop = t.get("target_drop")
    if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or not drop >= 0):
        raise ConfigError(f"trainer.target_drop={drop!r} is not allowed: null (every epoch) or points of top-1 >= 0")
    kd = t.get("distill") or {}
    if not 0 <= kd.get("alpha", 0.5) <= 1:
        raise ConfigError(f"trainer.distill.alpha={kd.get('alpha')} is not allowed: the distillation weight is in [0, 1]")
    if not kd.get("temperature", 2.0) > 0:
        raise ConfigError(f"trainer.distill.temperature={kd.get('temperature')} is not allowed: a temperature > 0")
    for key, value in (("trainer.precision", t.precision), ("bench.precision", cfg.bench.precision)):
        if value is not None:
            try:
                canonical_precision(value)
            except ValueError as exc:
                raise ConfigError(f"{key}{str(exc).removeprefix('precision')}") from None

    d = cfg.dataset
    if d.name not in DATASETS:
        raise ConfigError(f"dataset.name={d.name!r} is not allowed: choose one of {', '.join(DATASETS)}")
    if d.image_size <= 0 or d.in_chans <= 0 or d.num_classes <= 1:
        raise ConfigError(f"dataset.image_size={d.image_size}, in_chans={d.in_chans}, num_classes={d.num_classes}: "
                          "sizes must be >= 1 and num_classes >= 2")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"dataset.val_fraction={d.val_fraction} is not allowed: a fraction in (0, 1)")
    # the images calibration takes (synthetic ones only when asked: rank.fit=auto fits the weights there); other
    # datasets are checked when their split is read, before the baseline
    train_split = {"digits": DIGITS_IMAGES - math.ceil(DIGITS_IMAGES * d.val_fraction),
                   "synthetic": d.train_size if _v(cfg.rank.fit) == "activations" else None}.get(d.name)
    if train_split is not None and cfg.rank.calibration_images > train_split and _v(cfg.task) in ("train", "advise"):
        raise ConfigError(f"rank.calibration_images={cfg.rank.calibration_images} is not allowed here: between 1 "
                          f"and the training split's {train_split} images (dataset={d.name})")
    if d.name == "imagenet" and _v(cfg.task) in ("train", "evaluate"):
        root = d.root or os.path.join(cfg.paths.data_dir, d.name)
        if not os.path.isdir(root):
            raise ConfigError(f"dataset.root={root!r} does not exist: point it at an ImageFolder with train/ and val/")
    if d.name in ("cifar10", "cifar100") and _v(cfg.task) in ("train", "evaluate") and not d.download:
        root = d.root or os.path.join(cfg.paths.data_dir, d.name)
        if not os.path.isdir(root):
            raise ConfigError(f"dataset.root={root!r} does not exist: set dataset.download=true or point "
                              "dataset.root at the extracted CIFAR batches")

    check_model_name(cfg.model.name)
    if cfg.model.checkpoint is None and _v(cfg.task) == "evaluate":
        raise ConfigError("model.checkpoint=None is not allowed with task=evaluate: give the model file to evaluate "
                          "(a job's model.pt, a state_dict or a Lightning .ckpt)")
    # the checkpoint's contents are read where models are loaded: lrd_exp.tasks.checkpoint, at the job's start
