"""device.malloc: with 'tuned', freed host buffers are reused instead of being faulted in again every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrd_exp.devices import allocator

# Allocate, touch and free a 64 MiB buffer ten times; report the page faults of a typical (median) cycle.
PROBE = """
import json, os, statistics, sys
import lrd_exp.devices.npu  # as in a job (lrd_exp.tasks): torch and Lightning are loaded when it tunes
from lrd_exp.devices import allocator
mode = allocator.tune_malloc(sys.argv[1])
import torch
# 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so the system allocator maps it afresh every time;
# tuned, a buffer under the accepted threshold (all of it where glibc took 1 GiB)
size = min(64 << 20, (allocator.mmap_threshold() or 1 << 40) // 2)
faults = []
for _ in range(10):
    before = allocator.page_faults()
    t = torch.empty(size // 4)
    t.fill_(1.0)
    del t
    faults.append(allocator.page_faults() - before)
print(json.dumps({"mode": mode, "faults": statistics.median(faults), "reported": allocator.malloc_mode(),
                  "pages": size // 4096, "env": os.environ.get("MALLOC_TRIM_THRESHOLD_")}))
"""


def _probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # this process may be tuned
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc_mallopt() is None, reason="needs glibc on Linux")
def test_tuned_malloc_stops_refaulting_freed_buffers():
    system, tuned = _probe("system"), _probe("tuned")
    assert (system["mode"], system["reported"]) == ("system", "system")
    assert (tuned["mode"], tuned["reported"]) == ("tuned", "tuned")
    assert system["pages"] == 16384 and tuned["pages"] <= 16384
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.is_file() and "[always]" in thp.read_text()):  # with THP always, a fault maps 2 MiB at once
        # glibc's default returns a large buffer to the kernel on free: every cycle faults its pages in again
        assert system["faults"] >= system["pages"] * 0.9
    assert system["env"] is None and tuned["env"] is not None  # child processes inherit the tuning
    # tuned: the buffer stays in the heap, so a typical cycle faults (almost) nothing
    assert tuned["faults"] < tuned["pages"] * 0.05


def test_bad_mode_is_one_clear_error():
    with pytest.raises(ValueError, match=r"device.malloc='jemalloc': allowed system \| tuned"):
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


def test_system_after_tuned_stays_tuned_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(allocator, "_applied", "tuned")
    with caplog.at_level("WARNING"):
        assert allocator.tune_malloc("system") == "tuned"
    assert "already tuned" in caplog.text and allocator.malloc_mode() == "tuned"
