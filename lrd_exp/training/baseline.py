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
from typing import Any

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from lrd_exp.config.values import canonical_precision
from lrd_exp.results.io import write_torch_atomic

log = logging.getLogger(__name__)

LOCK_TIMEOUT_ENV = "LRD_BASELINE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 24 * 3600.0  # a baseline (ImageNet, a large model) can train for hours


def baseline_spec(model: DictConfig, dataset: DictConfig, trainer: DictConfig, seed: int) -> dict[str, Any]:
    """What defines a baseline (not rank, freeze, bench or logging): the ``model``, ``dataset`` (its worker count
    left out) and ``trainer`` nodes' defining keys, and the seed."""
    data = {k: v for k, v in OmegaConf.to_container(dataset, resolve=True).items() if k != "num_workers"}
    return {
        "model": OmegaConf.to_container(model, resolve=True),
        "dataset": data,
        "epochs": trainer.baseline_epochs, "batch_size": trainer.batch_size, "max_steps": trainer.max_steps,
        "precision": canonical_precision(trainer.precision),
        "optim": OmegaConf.to_container(trainer.baseline_optim, resolve=True, enum_to_str=True),
        "seed": seed,
    }


def baseline_key(spec: dict[str, Any]) -> str:
    """Hash of a :func:`baseline_spec`: the cache entry's name."""
    blob = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def entry_path(spec: dict[str, Any], cache_dir: str) -> str:
    """Where the baseline of ``spec`` is cached under ``cache_dir`` (``paths.cache_dir``)."""
    return os.path.join(cache_dir, "baselines", f"{spec['model']['name']}-{baseline_key(spec)}.pt")


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


def get_or_train(spec: dict[str, Any], cache_dir: str, train_fn: Callable[[], dict]) -> tuple[dict, bool, str]:
    """(entry, cache_hit, path) of the baseline that ``spec`` (:func:`baseline_spec`) defines, cached under
    ``cache_dir``. ``train_fn`` returns {"state_dict", "top1", ...} and runs under the lock."""
    path = entry_path(spec, cache_dir)
    entry = load_entry(path)
    if entry is not None:
        return entry, True, path
    with file_lock(path + ".lock"):
        entry = load_entry(path)  # another job may have finished it while we waited
        if entry is not None:
            return entry, True, path
        key = baseline_key(spec)
        entry = dict(train_fn())
        entry["complete"] = True
        entry["key"] = key
        write_torch_atomic(path, entry)
        with open(path.removesuffix(".pt") + ".json", "w") as fh:
            json.dump({"key": key, "top1": entry.get("top1"), "config": spec["model"]}, fh)
    return entry, False, path
