"""The allowed values of every enumerated key, and the checks of single values, in plain Python.

The one list of allowed values: :mod:`lrd_exp.config.schema` builds its enums from these tuples, and both the
config validation and the library (``decompose_model``, the freeze schedule) run these checks, so ``run.py`` and
``decompose_model(**cfg.rank)`` give the same verdict. Imports neither torch nor Hydra / OmegaConf.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

POLICIES = ("none", "ratio", "energy", "quantized", "optimized", "fixed")
ROUNDINGS = ("nearest", "up", "down")
BASES = ("ratio", "energy")  # the estimate quantized / optimized start from
BUDGETS = ("layer", "model")
# how ranks are spread over the model: uniform (every layer by the policy alike, the paper); global (one budget, the
# uniform ranks' total, spent where the measured damage per unit saved is least); fastest (the fastest ranks whose
# predicted damage stays within rank.max_damage)
ALLOCATIONS = ("uniform", "global", "fastest")
BUDGET_MEASURES = ("params", "flops", "time")  # what rank.allocation=global's budget counts
# how a layer's damage at a rank is found: measured (each cut run through the model) or fisher (a second-order
# estimate from the gradients of one pass; lrd_exp.decompose.damage)
DAMAGE_METHODS = ("measured", "fisher")
ALLOCATED_POLICIES = ("ratio", "energy", "quantized")  # the policies whose uniform ranks a global budget re-spreads
# auto: activations wherever calibration inputs exist, weights otherwise; weights: the paper's truncated SVD /
# HOSVD of the weights; activations: the least output error on the calibration inputs
FITS = ("auto", "weights", "activations")
# independent: every layer on the original model's inputs (one pass); sequential: each layer on the inputs of the
# already decomposed earlier layers
CALIBRATES = ("independent", "sequential")
OBJECTIVES = ("train", "inference", "both")
FREEZE_KINDS = ("none", "sequential", "alternating", "first", "last", "largest")
FREEZE_UNITS = ("epoch", "step")
IMPORTANCES = ("weight_change", "grad_norm", "depth", "reverse_depth", "size", "cost")
MEASURED_IMPORTANCES = ("weight_change", "grad_norm")  # only a training run can measure these
FACTOR_POSITIONS = ("first", "core", "last")  # a factorized layer's factors, in order
TASKS = ("train", "benchmark", "evaluate", "advise")
WANDB_MODES = ("offline", "online", "disabled")  # offline: sync later with `wandb sync`
ADVISE_SPEEDS = ("train", "infer")
ACCELERATORS = ("auto", "cpu", "cuda", "npu")
MALLOC_MODES = ("system", "tuned")  # tuned (opt-in): freed host buffers stay in the process (devices.allocator)
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "none")
# BatchNorm while fine-tuning: train (batch statistics, running statistics updated) | eval (the running statistics
# as decomposition left them, used and kept)
BN_MODES = ("train", "eval")
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagenet")  # lrd_exp.training.data builds each
# timm's eval crop modes and resize interpolations (timm.data.create_transform takes these names; a test checks)
CROP_MODES = ("center", "squash", "border")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")

#: Lightning's precision flags -> (autocast dtype, cast dtype) as torch attribute names; None: float32 / no autocast.
#: The one precision table: timing, the rank search and the NPU plugin read theirs from it.
PRECISIONS: dict[str, tuple[str | None, str | None]] = {
    "32-true": (None, None),
    "bf16-mixed": ("bfloat16", None),
    "16-mixed": ("float16", None),
    "bf16-true": (None, "bfloat16"),
    "16-true": (None, "float16"),
    "64-true": (None, "float64"),
}
#: the short aliases both ``trainer.precision`` and ``bench.precision`` accept
PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
MIXED_PRECISIONS = tuple(flag for flag, (amp, _) in PRECISIONS.items() if amp is not None)


def enum_value(value: Any) -> Any:
    """A config enum as its plain value (typed configs hand out Enum members; the library compares strings)."""
    return getattr(value, "value", value)


def check_choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` (a string or a config enum) if it is one of ``allowed``; else one ValueError naming the key."""
    value = enum_value(value)
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed: choose one of {', '.join(allowed)}")
    return value


def canonical_precision(value: Any) -> str:
    """A precision flag or alias (str, int or a config enum) as Lightning's long form; ValueError otherwise."""
    text = str(enum_value(value))
    flag = PRECISION_ALIASES.get(text, text)
    if flag not in PRECISIONS:
        allowed = ", ".join([*PRECISIONS, *PRECISION_ALIASES])
        raise ValueError(f"precision={text!r} is not allowed: choose one of {allowed}")
    return flag


# ------------------------------------------------------------------------------------------- rank keys
def _is_number(value: Any) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_count(key: str, value: Any, what: str = "an integer") -> int:
    """An int >= 1 (a bool is not), else one ValueError naming the key and ``what`` the value stands for."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} is not allowed: {what} >= 1")
    return value


def check_fraction(key: str, value: Any) -> float:
    """A number in [0, 1), else one ValueError naming the key."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{key}={value!r} is not allowed: a fraction in [0, 1)")
    return float(value)


def check_ratio(ratio: float) -> float:
    if not _is_number(ratio) or ratio <= 1:
        raise ValueError(f"rank.ratio={ratio!r} is not allowed: the compression ratio must be a number > 1")
    return float(ratio)


def check_energy(energy: float) -> float:
    if not isinstance(energy, (int, float)) or isinstance(energy, bool) or not 0 < energy <= 1:
        raise ValueError(f"rank.energy={energy!r} is not allowed: the kept energy fraction must be in (0, 1]")
    return float(energy)


def check_multiple(multiple: int) -> int:
    return check_count("rank.multiple", multiple, "the quantization step must be an integer")


def check_rounding(rounding: str) -> str:
    return check_choice("rank.rounding", rounding, ROUNDINGS)


def check_rank(rank: int, key: str = "rank.rank") -> int:
    return check_count(key, rank, "a rank must be an integer")


def check_window(window: float) -> float:
    return check_fraction("rank.window", window)


def check_step(step: int) -> int:
    return check_count("rank.step", step)


def check_tolerance(tolerance: float) -> float:
    return check_fraction("rank.tolerance", tolerance)


def check_fit(fit: str, calibrate: str, calibration_images: int) -> tuple[str, str, int]:
    """``rank.fit``, ``rank.calibrate`` and ``rank.calibration_images``: one ValueError naming the key."""
    fit = check_choice("rank.fit", fit, FITS)
    calibrate = check_choice("rank.calibrate", calibrate, CALIBRATES)
    check_count("rank.calibration_images", calibration_images, "a number of training images")
    return fit, calibrate, calibration_images


def check_end_to_end(check_images: Any, min_agreement: Any) -> tuple[int, float]:
    """``rank.check_images`` (held-out samples of the end-to-end check; 0: off) and ``rank.min_agreement`` (the share
    of unchanged predictions below which a decomposition warns): one ValueError naming the key."""
    if isinstance(check_images, bool) or not isinstance(check_images, int) or check_images < 0:
        raise ValueError(f"rank.check_images={check_images!r} is not allowed: a number of images >= 0 (0: no check)")
    if not _is_number(min_agreement) or not 0 <= min_agreement <= 1:
        raise ValueError(f"rank.min_agreement={min_agreement!r} is not allowed: a fraction in [0, 1]")
    return check_images, float(min_agreement)


def check_allocation(policy: str, allocation: Any, budget_by: Any, max_damage: Any, damage_images: Any,
                     damage_by: Any = "measured") -> tuple[str, str, float | None, int, str]:
    """``rank.allocation``, ``rank.budget_by``, ``rank.max_damage`` (null: the uniform ranks' predicted damage),
    ``rank.damage_images`` and ``rank.damage_by``: one ValueError naming the key."""
    allocation = check_choice("rank.allocation", allocation, ALLOCATIONS)
    budget_by = check_choice("rank.budget_by", budget_by, BUDGET_MEASURES)
    if max_damage is not None and (not _is_number(max_damage) or max_damage < 0):
        raise ValueError(f"rank.max_damage={max_damage!r} is not allowed: null (the uniform ranks' predicted damage) "
                         "or a number >= 0 (KL in nats for class scores, else relative output error)")
    check_count("rank.damage_images", damage_images, "a number of calibration images")
    damage_by = check_choice("rank.damage_by", damage_by, DAMAGE_METHODS)
    if allocation != "uniform" and policy not in ALLOCATED_POLICIES:
        raise ValueError(f"rank.allocation={allocation!r} is not allowed with rank.policy={policy}: it re-spreads the "
                         f"uniform ranks of rank.policy {', '.join(ALLOCATED_POLICIES)}")
    return allocation, budget_by, None if max_damage is None else float(max_damage), damage_images, damage_by


def check_rank_keys(*, policy: Any, ratio: Any, energy: Any, multiple: Any, rounding: Any, base: Any, rank: Any,
                    window: Any, step: Any, objective: Any, tolerance: Any, budget: Any, fit: Any,
                    calibrate: Any, calibration_images: Any, check_images: Any = 256, min_agreement: Any = 0.5,
                    allocation: Any = "uniform", budget_by: Any = "params", max_damage: Any = None,
                    damage_images: Any = 128, damage_by: Any = "measured", **_: Any) -> dict[str, Any]:
    """The ``rank`` node's rules, one ValueError naming the key: what ``run.py`` and ``decompose_model`` both run.

    Every numeric key is checked whatever the policy (a bad value is a typo, used or not). Returns the checked
    values, enums as their plain values (``include`` / ``exclude`` / ``skip_*`` are the caller's).
    """
    policy = check_choice("rank.policy", policy, POLICIES)
    rounding = check_rounding(rounding)
    budget = check_choice("rank.budget", budget, BUDGETS)
    base = check_choice("rank.base", base, BASES)
    objective = check_choice("rank.objective", objective, OBJECTIVES)
    check_ratio(ratio), check_energy(energy), check_multiple(multiple)
    if policy == "fixed" or rank is not None:  # a rank given with another policy is unused, but still a typo
        check_fixed_rank(rank)
    window, step, tolerance = check_window(window), check_step(step), check_tolerance(tolerance)
    fit, calibrate, calibration_images = check_fit(fit, calibrate, calibration_images)
    check_images, min_agreement = check_end_to_end(check_images, min_agreement)
    allocation, budget_by, max_damage, damage_images, damage_by = check_allocation(
        policy, allocation, budget_by, max_damage, damage_images, damage_by)
    return {"policy": policy, "ratio": ratio, "energy": energy, "multiple": multiple, "rounding": rounding,
            "base": base, "rank": rank, "window": window, "step": step, "objective": objective,
            "tolerance": tolerance, "budget": budget, "fit": fit, "calibrate": calibrate,
            "calibration_images": calibration_images, "check_images": check_images, "min_agreement": min_agreement,
            "allocation": allocation, "budget_by": budget_by, "max_damage": max_damage, "damage_images": damage_images,
            "damage_by": damage_by}


def check_fixed_rank(rank: Any) -> None:
    """``rank.rank`` under ``policy=fixed``: an int >= 1, or a mapping of name patterns to ints (checked per layer)."""
    if rank is None:
        raise ValueError("rank.rank=None is not allowed with rank.policy=fixed: give an int or {pattern: int}")
    if not isinstance(rank, Mapping):
        check_rank(rank)
        return
    for pattern, value in rank.items():
        check_rank(value, f"rank.rank[{str(pattern)!r}]")


# ------------------------------------------------------------------------------------------- freeze keys
def check_freeze(*, schedule: str, unit: str, warmup: int, period: int, per_stage: float, final_fraction: float,
                 importance: str, positions: Sequence[str], phases: Sequence[Sequence[str]], **_: Any) -> None:
    """The ``freeze`` node's values, one ValueError naming the key, the value and what is allowed."""
    check_choice("freeze.schedule", schedule, FREEZE_KINDS)
    check_choice("freeze.unit", unit, FREEZE_UNITS)
    if period <= 0:
        raise ValueError(f"freeze.period={period} is not allowed: it must be an integer >= 1")
    if warmup < 0:
        raise ValueError(f"freeze.warmup={warmup} is not allowed: it must be an integer >= 0")
    if not per_stage > 0:
        raise ValueError(f"freeze.per_stage={per_stage} is not allowed: a count >= 1 or a fraction in (0, 1)")
    if not 0 <= final_fraction <= 1:
        raise ValueError(f"freeze.final_fraction={final_fraction} is not allowed: it must be in [0, 1]")
    check_choice("freeze.importance", importance, IMPORTANCES)
    _check_positions([*positions, *(p for phase in phases for p in phase)])
    if schedule == "sequential" and not list(positions):
        raise ValueError(f"freeze.positions={list(positions)} is not allowed with freeze.schedule=sequential: it "
                         f"would freeze nothing; give some of {', '.join(FACTOR_POSITIONS)}")
    if not phases or not all(phases):
        raise ValueError(f"freeze.phases={phases} is not allowed: give a non-empty list of non-empty position lists")


def _check_positions(positions: Iterable[str]) -> None:
    for p in positions:
        if p not in FACTOR_POSITIONS:
            raise ValueError(f"freeze position {p!r} is not allowed (freeze.positions / freeze.phases): "
                             f"choose from {', '.join(FACTOR_POSITIONS)}")


# ------------------------------------------------------------------------------------------- input pipeline
def check_dataset(*, name: Any, in_chans: Any, num_classes: Any, val_fraction: Any, **_: Any) -> str:
    """The ``dataset`` node's own keys (the input pipeline's: :func:`check_preprocessing`): one ValueError naming
    the key, the value and what is allowed. Returns the name."""
    name = check_choice("dataset.name", name, DATASETS)
    check_count("dataset.in_chans", in_chans, "a number of input channels")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"dataset.num_classes={num_classes!r} is not allowed: a number of classes >= 2")
    if not _is_number(val_fraction) or not 0 < val_fraction < 1:
        raise ValueError(f"dataset.val_fraction={val_fraction!r} is not allowed: a fraction in (0, 1)")
    return name


def check_stats(key: str, value: Any, channels: int) -> tuple[float, ...] | None:
    """``dataset.mean`` / ``dataset.std``: None, or 1 or ``channels`` finite numbers (std > 0), as ``channels``
    numbers; else one ValueError naming the key."""
    if value is None:
        return None
    values = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else [value]
    ok = len(values) in (1, channels) and all(_is_number(v) for v in values)
    if ok and key.endswith("std"):
        ok = min(values) > 0
    if not ok:
        what = "numbers > 0" if key.endswith("std") else "numbers"
        raise ValueError(f"{key}={values!r} is not allowed: null (the model's) or 1 or in_chans={channels} {what}")
    values = [float(v) for v in values]
    return tuple(values * channels if len(values) == 1 else values)


def check_preprocessing(*, image_size: Any = None, mean: Any = None, std: Any = None, crop_pct: Any = None,
                        crop_mode: Any = None, interpolation: Any = None, channels: int = 3) -> dict[str, Any]:
    """The ``dataset.*`` input-pipeline keys (None: the model's): one ValueError naming the key. Returns the checked
    values, mean / std as ``channels`` numbers, enums as plain strings."""
    if image_size is not None:
        check_count("dataset.image_size", image_size, "null (the model's) or an image size in pixels")
    if crop_pct is not None and (not _is_number(crop_pct) or not 0 < crop_pct <= 1):
        raise ValueError(f"dataset.crop_pct={crop_pct!r} is not allowed: null (the model's) or the fraction in "
                         "(0, 1] of the resized image that the centre crop keeps")
    return {
        "image_size": image_size, "mean": check_stats("dataset.mean", mean, channels),
        "std": check_stats("dataset.std", std, channels),
        "crop_pct": None if crop_pct is None else float(crop_pct),
        "crop_mode": None if crop_mode is None else check_choice("dataset.crop_mode", crop_mode, CROP_MODES),
        "interpolation": None if interpolation is None else check_choice("dataset.interpolation", interpolation,
                                                                          INTERPOLATIONS),
    }


# ------------------------------------------------------------------------------------------- trainer keys
def check_calibrated(enabled: Any = True, lr_scale: Any = 0.1, warmup_epochs: Any = None, distill: Any = True,
                     bn: Any = "eval") -> None:
    """``trainer.calibrated``'s keys: one ValueError naming the first bad key, its value and what is allowed."""
    for key, value in (("enabled", enabled), ("distill", distill)):
        if not isinstance(value, bool):
            raise ValueError(f"trainer.calibrated.{key}={value!r} is not allowed: true or false")
    if not _is_number(lr_scale) or lr_scale <= 0:
        raise ValueError(f"trainer.calibrated.lr_scale={lr_scale!r} is not allowed: a factor > 0 of "
                         "trainer.finetune_optim.lr")
    if warmup_epochs is not None and (not _is_number(warmup_epochs) or warmup_epochs < 0):
        raise ValueError(f"trainer.calibrated.warmup_epochs={warmup_epochs!r} is not allowed: null (keep "
                         "trainer.finetune_optim.warmup_epochs) or epochs >= 0")
    check_choice("trainer.calibrated.bn", bn, BN_MODES)
