"""Opt-in host allocator tuning for CPU timing (``device.malloc=tuned``; the default ``system`` leaves it alone).

glibc's malloc hands every large buffer (activations, gradients) back to the kernel when it is freed and gets it
again, as fresh zeroed pages, on the next step. Those page faults cost time that varies with the host's load,
which adds noise to throughput numbers. Keeping freed memory in the process (what jemalloc / tcmalloc do, and
what Intel's PyTorch CPU tuning guide recommends) removes them, at the price that the process keeps its peak
host memory until it exits. ``experiments/timing_studies/machine_drift.py`` and ``profile_step.py`` measure it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

from lrd_exp.config.values import MALLOC_MODES

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Keep buffers up to 1 GiB on the heap (glibc 2.36 takes it); builds that refuse it get 32 MiB, the documented
# maximum of M_MMAP_THRESHOLD, and then larger buffers are still mapped afresh each time.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 1 << 30

_applied: str | None = None
_mmap_threshold: int | None = None


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it; musl's mallopt is a no-op
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def tune_malloc(mode: str | Enum = "tuned") -> str:
    """Apply `device.malloc` once per process; returns what is in effect ('tuned', 'system', or 'unsupported').

    'system' leaves the allocator alone. A process already tuned stays tuned (glibc cannot be asked to undo it
    cleanly, and one process measures everything under one allocator); asking for 'system' then warns.
    The same settings go into glibc's environment variables, so processes started from here (DDP workers,
    spawned data-loader workers) run under the same allocator."""
    global _applied, _mmap_threshold
    mode = getattr(mode, "name", mode)
    if mode not in MALLOC_MODES:
        raise ValueError(f"device.malloc={mode!r}: allowed {' | '.join(MALLOC_MODES)}")
    if _applied == "tuned":
        if mode == "system":
            log.warning("device.malloc=system: this process was already tuned by an earlier job and stays tuned "
                        "(rows record malloc=tuned); run it in a fresh process to measure the system allocator")
        return _applied
    if mode == "system":
        return _applied or "system"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        log.info("device.malloc=tuned: not glibc on Linux; the system allocator is used as it is")
        _applied = "unsupported"
        return _applied
    accepted = next((value for value in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, value) == 1), None)
    if accepted is None:
        _applied = "unsupported"
        return _applied
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(accepted))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    _applied, _mmap_threshold = "tuned", accepted
    return _applied


def mmap_threshold() -> int | None:
    """Buffers below this many bytes stay in the heap once tuned (None: not tuned)."""
    return _mmap_threshold


def malloc_mode() -> str:
    """What this process runs under, for the result row."""
    return _applied or "system"


def page_faults() -> int:
    """Minor page faults of this process so far (the cost `tune_malloc` removes)."""
    usage: Any = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_minflt)
