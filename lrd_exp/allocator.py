"""Host memory allocator tuning for CPU training.

glibc's malloc hands every large buffer (activations, gradients) back to the kernel when it is freed and gets it
again, as fresh zeroed pages, on the next step: a resnet18 training step at batch 64 took ~5,800 page faults. That
costs ~10 % of the step on a 2-core host and varies with the host's load, which adds noise to every throughput
number. Keeping freed memory in the process (what jemalloc / tcmalloc do, and what Intel's PyTorch CPU tuning guide
recommends) removes it: the same step then takes ~15 faults. The price is that the process keeps its peak
host memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Keep buffers up to 1 GiB on the heap; glibc builds that refuse it still take 32 MiB (its documented maximum).
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 1 << 30
MALLOC_MODES = ("tuned", "system")

_applied: str | None = None


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
    cleanly, and one process measures everything under one allocator)."""
    global _applied
    mode = getattr(mode, "name", mode)
    if mode not in MALLOC_MODES:
        raise ValueError(f"device.malloc={mode!r}: allowed {' | '.join(MALLOC_MODES)}")
    if _applied == "tuned" or mode == "system":
        return _applied or "system"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        log.info("device.malloc=tuned: not glibc on Linux; the system allocator is used as it is")
        _applied = "unsupported"
        return _applied
    if not any(mallopt(M_MMAP_THRESHOLD, value) == 1 for value in MMAP_THRESHOLDS):
        _applied = "unsupported"
        return _applied
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _applied = "tuned"
    return _applied


def malloc_mode() -> str:
    """What this process runs under, for the result row."""
    return _applied or "system"


def page_faults() -> int:
    """Minor page faults of this process so far (the cost `tune_malloc` removes)."""
    usage: Any = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_minflt)
