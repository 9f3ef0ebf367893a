"""The tasks' one decomposition step (:func:`decompose_copy`: train, benchmark and advise decompose through it), what
it gives :func:`~lrd_exp.decompose_model` (the layers it may select, checked before any work; the training images
the factors are fitted to and checked on; the context of the rank search) and what it demands back (a decomposition
that left every layer dense is no result; its report written once, its warnings logged)."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig
from torch import nn

from lrd_exp import results
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.config.validate import ConfigError
from lrd_exp.decompose import DecompositionWarning, decompose_model
from lrd_exp.decompose.rank_timings import write_timings
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.tasks.checkpoint import is_model_file
from lrd_exp.tasks.models import build_original, config_shape
from lrd_exp.tasks.settings import bench_batch_size, bench_channels_last, bench_precision

log = logging.getLogger("lrd_exp")


def decompose_copy(cfg: DictConfig, device: DeviceInfo, dm: Any, original: nn.Module, example: Any, out_dir: str, *,
                   rank: Mapping[str, Any] | None = None, calibration: list[Any] | None = None,
                   evaluation: list[Any] | None = None, table: bool = False) -> tuple[nn.Module, Any]:
    """A decomposed copy of ``original`` by ``cfg.rank`` (or ``rank``: the benchmark fits to the weights), fitted to
    ``calibration`` and checked on ``evaluation``; ``decomposition.txt`` (and with ``table``, ``decomposition.csv``;
    with ``policy=optimized``, ``rank_timings.csv``) written to ``out_dir``, the warnings logged one line each.
    Returns (model, report)."""
    decomposed = copy.deepcopy(original)
    os.makedirs(out_dir, exist_ok=True)
    with warnings.catch_warnings():  # the job logs them, not Python's warning printer
        warnings.simplefilter("ignore", DecompositionWarning)
        report = decompose_model(decomposed, **(rank if rank is not None else cfg.rank), example_input=example,
                                 calibration=calibration, evaluation=evaluation, seed=cfg.seed,
                                 rank_search=rank_search_context(cfg, device, dm))
    log_warnings(report)
    if table:
        report.to_frame().to_csv(os.path.join(out_dir, "decomposition.csv"), index=False)
    if report.rank_timings:
        write_timings(out_dir, report.rank_timings)
    results.write_text_atomic(os.path.join(out_dir, "decomposition.txt"), report.table(max_rows=None) + "\n")
    return decomposed, report


def check_model_selection(cfg: DictConfig) -> None:
    """``rank.include`` / ``rank.exclude`` patterns, ``rank.rank`` keys and ``freeze.positions`` checked against the
    model's layers before any work (a typo would otherwise run a whole job that decomposes or freezes nothing);
    ConfigError naming the pattern."""
    from lrd_exp.decompose.surgery import check_selection, find_candidates

    r = cfg.rank
    mapping = r.rank if _v(r.policy) == "fixed" and isinstance(r.rank, DictConfig) else None
    core_only = _v(cfg.freeze.schedule) == "sequential" and {_v(p) for p in cfg.freeze.positions} == {"core"}
    if _v(cfg.task) == "evaluate" or is_model_file(cfg.model.checkpoint) or not (
            r.include or r.exclude or mapping or core_only):
        return
    model = build_original(cfg.model, **config_shape(cfg), load=False)
    try:
        check_selection(model, include=r.include, exclude=r.exclude, rank=mapping)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if core_only and _v(r.policy) != "none":
        plans, _ = find_candidates(model, include=r.include, exclude=r.exclude, skip_stem=r.skip_stem,
                                   skip_head=r.skip_head)
        if not any(plan.kind == "tucker2" for plan in plans):
            raise ConfigError("freeze.positions=[core] selects no factor: only Tucker-2 (k x k conv) layers have a "
                              "core, and this model decomposes none; allowed here: first, last")


def calibration_inputs(cfg: DictConfig, dm: Any) -> list[Any] | None:
    """The training images a decomposition is fitted to (and BatchNorm re-estimated on), or None: on synthetic data
    ``rank.fit=auto`` fits the weights, and the fit changes accuracy only, never speed."""
    fit, allocated = _v(cfg.rank.fit), _v(cfg.rank.allocation) != "uniform"  # allocation measures damage on them
    if _v(cfg.rank.policy) == "none" or (fit == "weights" and not cfg.rank.recalibrate_bn and not allocated):
        return None
    if not dm.has_real_data and fit != "activations":
        log.info("no real data (dataset=%s): the factors are fitted to the weights; the fit (rank.fit) changes "
                 "accuracy only, not speed", dm.name)
        return None
    try:
        return dm.calibration_batches(int(cfg.rank.calibration_images), cfg.trainer.batch_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_inputs(cfg: DictConfig, dm: Any, calibration: list[Any] | None) -> list[Any] | None:
    """The end-to-end check's inputs: ``rank.check_images`` further training images of the run's seeded order, after
    the calibration ones (never validation: top-1 is reported there), or None (check off, policy none, no real data:
    then ``decompose_model`` checks on the calibration images, if any, and says so)."""
    n = int(cfg.rank.check_images)
    if not n or _v(cfg.rank.policy) == "none" or not dm.has_real_data:
        return None
    skip = sum(len(b) for b in calibration) if calibration else int(cfg.rank.calibration_images)
    batches = dm.held_out_batches(n, skip, cfg.trainer.batch_size)
    if not batches:
        log.warning("rank.check_images=%d: the training split has no image left after the %d calibration images; "
                    "the end-to-end check reuses the calibration images", n, skip)
    return batches or None


def check_fields(report: Any) -> dict[str, Any]:
    """The row's end-to-end check columns (null without a check) and what became of BatchNorm re-estimation."""
    c, a = report.check, report.allocation
    return {"check_images": c.images if c else None, "check_held_out": c.held_out if c else None,
            "check_agreement": c.agreement if c else None, "check_kl": c.kl if c else None,
            "check_rel_error": c.rel_error if c else None, "bn_recalibration": report.bn_recalibration,
            "decomposition_warning": report.warnings[0] if report.warnings else None,
            "predicted_damage": a["predicted_damage"] if a else None,
            "uniform_predicted_damage": a["uniform_predicted_damage"] if a else None}


def log_warnings(report: Any) -> None:
    """A decomposition's warnings (a collapsed model), each one line in the job's log."""
    for message in report.warnings:
        log.warning("decomposition: %s", message)


def rank_search_context(cfg: DictConfig, device: DeviceInfo, dm: Any) -> dict[str, Any]:
    """What rank.policy=optimized (and rank.allocation) needs to time candidates like the run will execute them, and
    where rank.allocation caches the layers' damages."""
    b = cfg.bench
    return {"batch_size": bench_batch_size(cfg), "device": device,
            "precision": bench_precision(cfg), "channels_last": bench_channels_last(cfg),
            "cache_dir": os.path.join(cfg.paths.cache_dir, "rank_timings"), "warmup": b.warmup,
            "damage_cache_dir": os.path.join(cfg.paths.cache_dir, "rank_damage"),
            "steps": b.steps, "compile": b.compile}


def require_decomposed(cfg: DictConfig, report: Any) -> None:
    """A decomposition that left every layer dense (policy other than none) is not a result: ConfigError with why."""
    if _v(cfg.rank.policy) != "none" and not report.decomposed:
        raise ConfigError(f"no layer was decomposed with rank.policy={_v(cfg.rank.policy)}: {report.why_dense()} "
                          "(decomposition.txt lists every layer)")
