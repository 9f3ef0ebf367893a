"""The baseline cache: one trained original model per defining config, shared by every job of a sweep.

Keyed by a hash of exactly the config that defines the baseline (model, data, baseline training, seed,
precision), so a rank or freeze sweep reuses it. Concurrent jobs serialise on a file lock (``filelock``): one
trains, the others wait and load; a wait longer than ``$LRD_BASELINE_LOCK_TIMEOUT`` seconds (default 24 h) fails
with a line saying what to do. Entries are written atomically and verified on load; a corrupt one is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from lrd_exp.config.values import canonical_precision
from lrd_exp.results.io import write_torch_atomic

log = logging.getLogger(__name__)

LOCK_TIMEOUT_ENV = "LRD_BASELINE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 24 * 3600.0  # a baseline (ImageNet, a large model) can train for hours


def baseline_key(cfg: DictConfig) -> str:
    """Hash of the config that defines the baseline (not rank, freeze, bench or logging)."""
    t = cfg.trainer
    dataset = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k != "num_workers"}
    spec = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": dataset,
        "epochs": t.baseline_epochs, "batch_size": t.batch_size, "max_steps": t.max_steps,
        "precision": canonical_precision(t.precision),
        "optim": OmegaConf.to_container(t.baseline_optim, resolve=True, enum_to_str=True),
        "seed": cfg.seed,
    }
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class BaselineLockTimeout(TimeoutError):
    """Another job held the baseline's lock longer than the timeout (the message says what to do)."""


def lock_timeout() -> float:
    """Seconds to wait for another job's baseline: ``$LRD_BASELINE_LOCK_TIMEOUT``, else 24 h; < 0 waits forever."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r} is not a number of seconds") from None


@contextlib.contextmanager
def file_lock(path: str, timeout: float | None = None) -> Iterator[None]:
    """An exclusive lock on ``path`` (released by the OS if the holder dies), waiting at most ``timeout`` seconds
    (default :func:`lock_timeout`); a longer wait raises :class:`BaselineLockTimeout` naming the lock file."""
    timeout = lock_timeout() if timeout is None else timeout
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lock = FileLock(path, timeout=timeout)
    start = time.monotonic()
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another job that holds %s (up to %g s)", path, timeout)
        try:
            lock.acquire()
        except Timeout as exc:
            waited = time.monotonic() - start
            raise BaselineLockTimeout(
                f"waited {waited:.1f} s for another job training this baseline (lock {path}); delete {path} if no "
                f"job is running, or raise {LOCK_TIMEOUT_ENV} (now {timeout:g} s; < 0 waits forever)"
            ) from exc
    try:
        yield
    finally:
        lock.release()


def load_entry(path: str) -> dict | None:
    """A complete cache entry, or None when missing, partial or corrupt."""
    if not os.path.isfile(path):
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
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
        write_torch_atomic(path, entry)
        with open(os.path.join(directory, f"{cfg.model.name}-{key}.json"), "w") as fh:
            json.dump({"key": key, "top1": entry.get("top1"), "config": OmegaConf.to_container(cfg.model)}, fh)
    return entry, False, path
