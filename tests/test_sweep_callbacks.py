"""A real multirun through run.py: aggregated tables, the offline W&B table, one shared baseline, figures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir = tmp / "multirun"
    cmd = [sys.executable, "run.py", "-m", "trainer=smoke", "trainer.enable_progress_bar=false",
           "rank.policy=none,quantized", "freeze=none,sequential", "freeze.unit=step",
           f"paths.cache_dir={tmp / 'cache'}", f"paths.data_dir={tmp / 'data'}", f"hydra.sweep.dir={sweep_dir}",
           "bench.warmup=1", "bench.steps=2", "rank.fit=weights"]  # aggregation, not the fit
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sweep_dir, tmp, proc


def test_sweep_tables_and_wandb_table(sweep):
    sweep_dir, tmp, proc = sweep
    df = pd.read_csv(sweep_dir / "results.csv")
    assert len(df) == 4
    assert set(zip(df.rank_policy, df.freeze)) == {("none", "none"), ("none", "sequential"),
                                                   ("quantized", "none"), ("quantized", "sequential")}
    assert (df.status == "ok").all()
    md = (sweep_dir / "results.md").read_text()
    assert md.count("\n| ") >= 5  # header + 4 rows
    # the baseline was trained once and shared
    assert sorted(df.baseline_cache_hit.tolist()) == [False, True, True, True]
    assert len(list((tmp / "cache" / "baselines").glob("*.pt"))) == 1
    # quantized rows are smaller than the original; 'none' rows are not
    for _, r in df.iterrows():
        if r.rank_policy == "none":
            assert r.params_decomposed == r.params_original
        else:
            assert r.params_decomposed < r.params_original
    # one offline W&B run for the sweep holds the same rows as a wandb.Table
    from lrd_exp.results import find_wandb_table_files

    files = find_wandb_table_files(sweep_dir)
    assert files, "no offline W&B table file"
    table = json.loads(files[-1].read_text())
    assert len(table["data"]) == 4
    cols = table["columns"]
    wandb_pairs = {(row[cols.index("rank_policy")], row[cols.index("freeze")]) for row in table["data"]}
    assert wandb_pairs == set(zip(df.rank_policy, df.freeze))
    ips = sorted(row[cols.index("train_ips_decomposed")] for row in table["data"])
    assert ips == pytest.approx(sorted(df.train_ips_decomposed))


def test_rerun_skips_complete_jobs(sweep):
    sweep_dir, tmp, _ = sweep
    cmd = [sys.executable, "run.py", "-m", "trainer=smoke", "trainer.enable_progress_bar=false", "logger=csv",
           "rank.policy=none,quantized", "freeze=none,sequential", "freeze.unit=step",
           f"paths.cache_dir={tmp / 'cache'}", f"paths.data_dir={tmp / 'data'}", f"hydra.sweep.dir={sweep_dir}",
           "bench.warmup=1", "bench.steps=2", "rank.fit=weights"]  # aggregation, not the fit
    # logger=csv changes the job dir names (it is an override), so re-run exactly the same overrides instead
    cmd = [c for c in cmd if c != "logger=csv"]
    before = {p: p.stat().st_mtime for p in sweep_dir.rglob("result.json")}
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("complete: skipping") + proc.stderr.count("complete: skipping") == 4
    after = {p: p.stat().st_mtime for p in sweep_dir.rglob("result.json")}
    assert before == after
    assert len(pd.read_csv(sweep_dir / "results.csv")) == 4


def test_figures_from_sweep(sweep, tmp_path):
    sweep_dir, _, _ = sweep
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, "experiments/paper_figures.py", str(sweep_dir), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 2
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


@pytest.mark.slow
def test_optuna_sweep_returns_the_objective(tmp_path):
    import yaml

    sweep_dir = tmp_path / "optuna"
    cmd = [sys.executable, "run.py", "experiment=optuna_digits", "trainer=smoke", "logger=csv",
           "hydra.sweeper.n_trials=2", "trainer.enable_progress_bar=false", "bench.warmup=1", "bench.steps=2",
           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    df = pd.read_csv(sweep_dir / "results.csv")
    assert len(df) == 2 and (df.status == "ok").all()
    # the objective is the decomposed training throughput, or -drop when top-1 fell by more than 1.5 points
    expected = [(-r.top1_drop if r.top1_drop > 1.5 else r.train_ips_decomposed) for r in df.itertuples()]
    assert best["best_value"] == pytest.approx(max(expected))
