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


def test_advise_proxy_check_ranks_the_proxy_against_fine_tuned_top1(tmp_path):
    """A proxy that orders configurations exactly opposite to their top-1 reads rho = -1; the join keeps seeds."""
    for seed in (0, 1):
        job = tmp_path / "advise" / f"seed={seed}"
        job.mkdir(parents=True)
        pd.DataFrame({"model": "resnet18", "seed": seed, "configuration": ["original", "a", "b", "c"],
                      "rank.ratio": [None, 2, 4, 8], "approx_error": [0.0, 0.1, 0.2, 0.4 + seed / 100],
                      "top1_pre": [98.0, 60.0, 30.0, 10.0], "params_ratio": [1, 2, 4, 8],
                      "status": "ok"}).to_csv(job / "advice.csv", index=False)
    tuned = pd.DataFrame([{"model": "resnet18", "seed": s, "rank_ratio": r, "freeze": f, "rank_policy": "quantized",
                           "top1_decomposed": 99 - r - s / 10, "top1_decomposed_pre": pre, "status": "ok"}
                          for s in (0, 1) for r, pre in ((2, 60.0), (4, 30.0), (8, 10.0)) for f in ("none", "seq")])
    tuned.to_csv(tmp_path / "results.csv", index=False)
    proc = subprocess.run([sys.executable, "experiments/advise_proxy_check.py", str(tmp_path / "advise"),
                           str(tmp_path / "results.csv"), "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "out" / "proxy_check.md").read_text()
    assert "| resnet18 | ratio means | -1.00 (p=0, n=3) |" in text
    assert "| resnet18 | (ratio, seed) |" in text and "n=6)" in text
    assert "largest difference 0.00 points over 6 configurations (6 identical)" in text
    assert len(pd.read_csv(tmp_path / "out" / "advice_all.csv")) == 6  # the originals are not configurations
