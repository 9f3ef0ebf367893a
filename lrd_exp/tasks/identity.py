"""Who a result row is: where the job writes (its Hydra output dir), the code it ran (git), the overrides and
variant it was composed with, and the config's identity columns. Every task's row starts from :func:`identity_row`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lrd_exp.config.schema import enum_value as _v
from lrd_exp.devices.allocator import malloc_mode
from lrd_exp.tasks.settings import bench_batch_size, bench_channels_last, bench_precision

CODE_PATHS = ("lrd_exp", "conf", "run.py", "pyproject.toml")


def output_dir(cfg: DictConfig) -> str:
    """``paths.output_dir`` when set (tests, scripts), else Hydra's job dir, else the working dir; created."""
    out = cfg.paths.get("output_dir") if "output_dir" in cfg.paths else None
    if not out:
        out = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
    os.makedirs(out, exist_ok=True)
    return out


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
    """The command line's overrides, so a row says how to run it again ('' outside Hydra)."""
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
    """The row's identity columns: what was run (model, data, rank, freeze, bench settings), by which code, when."""
    rank = OmegaConf.to_container(cfg.rank, resolve=True, enum_to_str=True)
    freeze = OmegaConf.to_container(cfg.freeze, resolve=True, enum_to_str=True)
    return {
        "model": cfg.model.name, "dataset": cfg.dataset.name, "task": _v(cfg.task), "variant": variant_choice(),
        "rank_policy": rank["policy"], "rank_ratio": rank["ratio"], "rank_energy": rank["energy"],
        "rank_multiple": rank["multiple"], "rank_params": json.dumps(rank, sort_keys=True),
        "freeze": freeze["schedule"], "freeze_params": json.dumps(freeze, sort_keys=True),
        "device": _v(cfg.device.accelerator), "precision": bench_precision(cfg),
        "batch_size": bench_batch_size(cfg), "channels_last": bench_channels_last(cfg),
        "malloc": malloc_mode(), "seed": cfg.seed,
        "git_commit": git_commit(), "overrides": overrides_string(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "output_dir": out_dir,
    }
