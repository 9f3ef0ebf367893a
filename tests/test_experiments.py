"""The prepared GPU script runs end to end on the CPU in its TINY mode (plumbing only, no GPU numbers)."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from conftest import REPO


def test_gpu_script_parses():
    proc = subprocess.run(["bash", "-n", "experiments/gpu_reproduce.sh"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_gpu_script_tiny_mode_on_cpu(tmp_path):
    env = dict(os.environ, TINY="1", OUT=str(tmp_path / "gpu"), PYTHON=sys.executable, OMP_NUM_THREADS="1",
               WANDB_MODE="offline")
    proc = subprocess.run(["bash", "experiments/gpu_reproduce.sh"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "gpu"
    for name, rows in (("resnet50", 13), ("vit_base", 13), ("vit_base_compiled", 2), ("vit_saw_tooth", 1)):
        df = pd.read_csv(out / name / "results.csv")
        assert len(df) == rows and (df["status"] == "ok").all(), (name, df.get("error"))
    saw = pd.read_csv(out / "vit_saw_tooth" / "rank_timings.csv")
    assert set(saw["layer"]) == {"blocks.0.mlp.fc1"} and len(saw) > 5
    assert (out / "PROVENANCE.md").read_text().count("- ") >= 4
    assert (out / "figures" / "speedup_bars.png").is_file()
