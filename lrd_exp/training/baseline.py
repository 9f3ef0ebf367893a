"""The baseline cache: one trained original model per defining config, shared by every job of a sweep.

Keyed by a hash of exactly the config that defines the baseline (model, data, baseline training, seed,
precision), so a rank or freeze sweep reuses it. Concurrent jobs serialise on a file lock: one trains, the
others wait and load. Entries are written atomically and verified on load; a corrupt one is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def baseline_key(cfg: DictConfig) -> str:
    """Hash of the config that defines the baseline (not rank, freeze, bench or logging)."""
    t = cfg.trainer
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k != "num_workers"}
    spec = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": dataset,
        "epochs": t.baseline_epochs, "batch_size": t.batch_size, "max_steps": t.max_steps,
        "precision": str(t.precision), "optim": OmegaConf.to_container(t.baseline_optim, resolve=True),
        "seed": cfg.seed,
    }
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS if the holder dies)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_atomic(obj: Any, path: str) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def load_entry(path: str) -> dict | None:
    """A complete cache entry, or None when missing, partial or corrupt."""
    if not os.path.isfile(path):
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated / garbage file
        log.warning("baseline cache entry %s is corrupt (%s): rebuilding it", path, exc)
        return None
    if not isinstance(entry, dict) or not entry.get("complete") or "state_dict" not in entry:
        log.warning("baseline cache entry %s is incomplete: rebuilding it", path)
        return None
    return entry


def get_or_train(cfg: DictConfig, train_fn: Callable[[], dict]) -> tuple[dict, bool, str]:
    """(entry, cache_hit, path). ``train_fn`` returns {"state_dict", "top1", ...} and runs under the lock."""
    key = baseline_key(cfg)
    directory = os.path.join(cfg.paths.cache_dir, "baselines")
    path = os.path.join(directory, f"{cfg.model.name}-{key}.pt")
    entry = load_entry(path)
    if entry is not None:
        return entry, True, path
    with file_lock(path + ".lock"):
        entry = load_entry(path)  # another job may have finished it while we waited
        if entry is not None:
            return entry, True, path
        entry = dict(train_fn())
        entry["complete"] = True
        entry["key"] = key
        save_atomic(entry, path)
        with open(os.path.join(directory, f"{cfg.model.name}-{key}.json"), "w") as fh:
            json.dump({"key": key, "top1": entry.get("top1"), "config": OmegaConf.to_container(cfg.model)}, fh)
    return entry, False, path
