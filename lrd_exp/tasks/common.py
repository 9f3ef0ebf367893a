"""What every task shares: the output dir, the row's identity, the model, and the run's measuring settings."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrd_exp import results
from lrd_exp.config.schema import canonical_precision
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.config.validate import ConfigError, read_checkpoint
from lrd_exp.deploy import model_file
from lrd_exp.devices.allocator import malloc_mode
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.training.classifier import make_optimizer

log = logging.getLogger("lrd_exp")


class JobFailed(RuntimeError):
    """A job ran but failed (its row says ``status: failed`` and why): the command must not look successful."""


def output_dir(cfg: DictConfig) -> str:
    out = cfg.paths.get("output_dir") if "output_dir" in cfg.paths else None
    if not out:
        out = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
    os.makedirs(out, exist_ok=True)
    return out


CODE_PATHS = ("lrd_exp", "conf", "run.py", "pyproject.toml")


def git_commit(root: str | None = None) -> str | None:
    """HEAD's short hash, '-dirty' when the code that runs (CODE_PATHS) has uncommitted changes."""
    root = root or str(Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        # only the code that runs: results/ and docs written between jobs must not mark later rows dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return None


def slug(label: str) -> str:
    """A label as a folder name: safe characters only, at most 80 of them."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label)[:80]


def overrides_string() -> str:
    if not HydraConfig.initialized():
        return ""
    return " ".join(HydraConfig.get().overrides.task)


def variant_choice() -> str | None:
    """The ``variant=`` config group this job was composed with (the paper's variant names), if any."""
    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get("variant")
    return None if choice in (None, "null") else str(choice)


def identity_row(cfg: DictConfig, out_dir: str) -> dict[str, Any]:
    rank = OmegaConf.to_container(cfg.rank, resolve=True, enum_to_str=True)
    freeze = OmegaConf.to_container(cfg.freeze, resolve=True, enum_to_str=True)
    return {
        "model": cfg.model.name, "dataset": cfg.dataset.name, "task": _v(cfg.task), "variant": variant_choice(),
        "rank_policy": rank["policy"], "rank_ratio": rank["ratio"], "rank_energy": rank["energy"],
        "rank_multiple": rank["multiple"], "rank_params": json.dumps(rank, sort_keys=True),
        "freeze": freeze["schedule"], "freeze_params": json.dumps(freeze, sort_keys=True),
        "device": _v(cfg.device.accelerator), "precision": bench_precision(cfg),
        "batch_size": cfg.bench.batch_size or cfg.trainer.batch_size, "channels_last": bench_channels_last(cfg),
        "malloc": malloc_mode(), "seed": cfg.seed,
        "git_commit": git_commit(), "overrides": overrides_string(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "output_dir": out_dir,
    }


def build_model(cfg: DictConfig, *, num_classes: int, in_chans: int, image_size: int,
                load: bool = True) -> nn.Module:
    """The timm model of ``cfg.model`` for the dataset's shape; ``load``: with ``model.checkpoint``'s weights (a
    state_dict or Lightning checkpoint; an lrd-exp model file is loaded by :func:`load_model_file` instead)."""
    m = cfg.model
    kwargs = dict(OmegaConf.to_container(m.kwargs, resolve=True) or {})
    kwargs.update(num_classes=num_classes, in_chans=in_chans, drop_rate=m.drop_rate)
    size = m.image_size or image_size
    try:
        try:
            model = timm.create_model(m.name, pretrained=m.pretrained, img_size=size, **kwargs)
        except TypeError:  # architectures without an image-size argument (CNNs)
            model = timm.create_model(m.name, pretrained=m.pretrained, **kwargs)
    except RuntimeError as exc:
        if m.pretrained:
            raise RuntimeError(f"model.pretrained=true: could not load timm weights for {m.name!r} "
                               f"(they are downloaded from the internet on first use): {exc}") from exc
        raise
    if load and m.checkpoint and not is_model_file(m.checkpoint):
        load_checkpoint(model, m.checkpoint, trust=bool(m.trust_checkpoint))
    return model


def is_model_file(path: str | None) -> bool:
    """``model.checkpoint`` is an lrd-exp model file (a decomposed model to keep training or to evaluate)."""
    return bool(path) and model_file.is_model_file(path)


def load_model_file(cfg: DictConfig, **shape: int) -> nn.Module:
    """The decomposed model saved at ``model.checkpoint``, rebuilt on a fresh ``cfg.model`` (no SVD)."""
    try:
        return model_file.load_decomposed(cfg.model.checkpoint, model=build_model(cfg, **shape, load=False))
    except model_file.ModelFileError as exc:
        raise ConfigError(f"model.checkpoint: {exc}") from None


def load_checkpoint(model: nn.Module, path: str, *, trust: bool = False) -> None:
    state = read_checkpoint(path, trust=trust)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint={path!r} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"model.checkpoint={path!r} does not fit {type(model).__name__}: {first}") from None


def rank_search_context(cfg: DictConfig, device: DeviceInfo, dm: Any) -> dict[str, Any]:
    """What rank.policy=optimized needs to time candidates like the run will execute them."""
    b = cfg.bench
    return {"batch_size": b.batch_size or cfg.trainer.batch_size, "device": device,
            "precision": bench_precision(cfg), "channels_last": bench_channels_last(cfg),
            "cache_dir": os.path.join(cfg.paths.cache_dir, "rank_timings"), "warmup": b.warmup,
            "steps": b.steps, "compile": b.compile, "output_dir": output_dir(cfg)}


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


def freeze_total_units(cfg: DictConfig, steps_per_epoch: int | None = None) -> int:
    t = cfg.trainer
    if _v(cfg.freeze.unit) == "step":
        if t.max_steps > 0:
            return t.max_steps
        return t.finetune_epochs * (steps_per_epoch or 1)
    return max(t.finetune_epochs, 1)


def write_failed_row(cfg: DictConfig, error: str) -> str | None:
    """A sweep job stopped by a user error before it began: a failed row, unless a finished one is there."""
    try:
        out_dir = output_dir(cfg)
        path = os.path.join(out_dir, "result.json")
        existing = results.read_result(path)
        if existing and results.is_complete(existing):
            return None  # never replace a finished row
        row = identity_row(cfg, out_dir)
        row.update(status="failed", error=error, device=_v(cfg.device.accelerator))
        results.write_result(out_dir, results.make_row(**row))
        return path
    except Exception:  # the row is a courtesy: the one-line error is already printed
        log.debug("could not write a failed row", exc_info=True)
        return None


def objective_value(cfg: DictConfig, row: dict[str, Any]) -> float | None:
    """The sweep objective: ``objective.metric`` of an ok row, or -drop when top-1 fell too far."""
    if row.get("status") != "ok":
        return None
    drop, limit = row.get("top1_drop"), cfg.objective.max_top1_drop
    if limit is not None and drop is not None and drop > limit:
        return -float(drop)
    value = row.get(cfg.objective.metric)
    return float(value) if isinstance(value, (int, float)) else None


def calibration_inputs(cfg: DictConfig, dm: Any) -> list[Any] | None:
    """The training images a decomposition is fitted to (and BatchNorm re-estimated on), or None: on synthetic data
    ``rank.fit=auto`` fits the weights, and the fit changes accuracy only, never speed."""
    fit = _v(cfg.rank.fit)
    if _v(cfg.rank.policy) == "none" or (fit == "weights" and not cfg.rank.recalibrate_bn):
        return None
    if not dm.has_real_data and fit != "activations":
        log.info("no real data (dataset=%s): the factors are fitted to the weights; the fit (rank.fit) changes "
                 "accuracy only, not speed", dm.name)
        return None
    try:
        return dm.calibration_batches(int(cfg.rank.calibration_images), cfg.trainer.batch_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_model_selection(cfg: DictConfig) -> None:
    """``rank.include`` / ``rank.exclude`` patterns and ``rank.rank`` keys checked against the model's layers before
    any work (a typo would otherwise run a whole job that decomposes nothing); ConfigError naming the pattern."""
    from lrd_exp.decompose.surgery import check_selection

    r = cfg.rank
    mapping = r.rank if _v(r.policy) == "fixed" and isinstance(r.rank, DictConfig) else None
    if _v(cfg.task) == "evaluate" or not (r.include or r.exclude or mapping) or is_model_file(cfg.model.checkpoint):
        return
    d = cfg.dataset
    model = build_model(cfg, num_classes=d.num_classes, in_chans=d.in_chans, image_size=d.image_size, load=False)
    try:
        check_selection(model, include=r.include, exclude=r.exclude, rank=mapping)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def require_decomposed(cfg: DictConfig, report: Any) -> None:
    """A decomposition that left every layer dense (policy other than none) is not a result: ConfigError with why."""
    if _v(cfg.rank.policy) != "none" and not report.decomposed:
        raise ConfigError(f"no layer was decomposed with rank.policy={_v(cfg.rank.policy)}: {report.why_dense()} "
                          "(decomposition.txt lists every layer)")
