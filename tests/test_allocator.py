"""device.malloc: with 'tuned', freed host buffers are reused instead of being faulted in again every step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lrd_exp import allocator

# Allocate, touch and free a 64 MiB buffer ten times; report the page faults of a typical (median) cycle.
PROBE = """
import json, statistics, sys
from lrd_exp import allocator
mode = allocator.tune_malloc(sys.argv[1])
import torch
faults = []
for _ in range(10):
    before = allocator.page_faults()
    t = torch.empty(16 << 20)
    t.fill_(1.0)
    del t
    faults.append(allocator.page_faults() - before)
print(json.dumps({"mode": mode, "faults": statistics.median(faults), "reported": allocator.malloc_mode()}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc_mallopt() is None, reason="needs glibc on Linux")
def test_tuned_malloc_stops_refaulting_freed_buffers():
    system, tuned = _probe("system"), _probe("tuned")
    assert (system["mode"], system["reported"]) == ("system", "system")
    assert (tuned["mode"], tuned["reported"]) == ("tuned", "tuned")
    pages_per_cycle = (64 << 20) // 4096
    # glibc's default returns the 64 MiB to the kernel on free: every cycle faults its pages in again
    assert system["faults"] >= pages_per_cycle * 0.9
    # tuned: the buffer stays in the heap, so a typical cycle faults (almost) nothing
    assert tuned["faults"] < pages_per_cycle * 0.05


def test_bad_mode_is_one_clear_error():
    with pytest.raises(ValueError, match=r"device.malloc='jemalloc': allowed tuned \| system"):
        allocator.tune_malloc("jemalloc")


def test_system_leaves_the_process_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    called = []
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: called.append(1))
    assert allocator.tune_malloc("system") == "system"
    assert called == [] and allocator.malloc_mode() == "system"


def test_not_glibc_is_reported_not_an_error(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: None)
    assert allocator.tune_malloc("tuned") == "unsupported"
    assert allocator.malloc_mode() == "unsupported"
