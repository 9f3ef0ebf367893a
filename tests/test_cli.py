"""Robustness: bad input fails fast, killed sweeps resume cleanly, concurrent jobs share a baseline,
non-finite losses fail the row (not the sweep), and resume continues from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from conftest import REPO, run_cli

# the weight fit: these tests are about the command line, not the fit (test_tasks_train runs the default one)
SMOKE = ["trainer=smoke", "logger=csv", "trainer.enable_progress_bar=false", "bench.warmup=1", "bench.steps=2",
         "rank.fit=weights"]


def _env():
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# ------------------------------------------------------------------ 1. bad input, in process (fast)
@pytest.mark.parametrize("overrides,needles", [
    (["rank.ratio=1.0"], ["rank.ratio", "1.0", "> 1"]),
    (["rank.energy=1.5", "rank.policy=energy"], ["rank.energy", "1.5", "(0, 1]"]),
    (["rank.multiple=0"], ["rank.multiple", "0", ">= 1"]),
    (["trainer.finetune_epochs=-2"], ["trainer.finetune_epochs", "-2", ">= 0"]),
    (["trainer.baseline_epochs=-1"], ["trainer.baseline_epochs", "-1"]),
    (["trainer.batch_size=0"], ["trainer.batch_size", "0", ">= 1"]),
    (["freeze.period=0"], ["freeze.period", "0", ">= 1"]),
    (["freeze.positions=[middle]"], ["middle", "first, core, last"]),
    (["model.name=resnet5O"], ["model.name", "resnet5O", "resnet50"]),
    (["dataset=imagenet"], ["dataset.root", "does not exist"]),
    (["dataset=cifar10"], ["dataset.root", "dataset.download=true"]),
    (["device=cuda"], ["device=cuda", "no CUDA GPU"]),
    (["device=npu"], ["torch_npu"]),
    (["trainer.baseline_optim.warmup_epochs=-1"], ["trainer.baseline_optim.warmup_epochs", "-1", ">= 0"]),
    (["trainer.finetune_optim.lr=0"], ["trainer.finetune_optim.lr", "0", "> 0"]),
    (["rank.calibration_images=0"], ["rank.calibration_images", "0", ">= 1"]),
    (["rank.calibration_images=1438"], ["rank.calibration_images", "1438", "1437 images"]),
    (["rank.check_images=-5"], ["rank.check_images", "-5", ">= 0"]),
    (["rank.min_agreement=2"], ["rank.min_agreement", "2", "[0, 1]"]),
    (["rank.max_damage=-1"], ["rank.max_damage", "-1", ">= 0"]),
    (["rank.damage_images=0"], ["rank.damage_images", "0", ">= 1"]),
    (["rank.allocation=global", "rank.policy=optimized"], ["rank.allocation", "global", "optimized", "quantized"]),
    (["rank.allocation=global", "dataset=synthetic"], ["rank.allocation", "global", "dataset=synthetic", "uniform"]),
])
def test_bad_input_one_line_no_files(tmp_path, capsys, overrides, needles):
    if "device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from conftest import compose_config

    from lrd_exp.cli import run_job

    cfg = compose_config(overrides, tmp_path=tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_job(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out" / "result.json").exists()
    assert not (tmp_path / "cache").exists()


def test_unknown_policy_and_freeze_fail_at_composition(tmp_path):
    from conftest import compose_config
    from hydra.errors import ConfigCompositionException

    for override, allowed in (("rank.policy=fast", "quantized"), ("freeze=weird", "sequential")):
        with pytest.raises(ConfigCompositionException) as exc:
            compose_config([override], tmp_path=tmp_path)
        text = str(exc.value) + str(exc.value.__cause__)
        assert override.split("=")[1] in text and allowed in text


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    from conftest import compose_config

    from lrd_exp.cli import run_job

    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    cfg = compose_config([f"model.checkpoint={bad}"], tmp_path=tmp_path)
    with pytest.raises(SystemExit):
        run_job(cfg)
    err = capsys.readouterr().err
    assert "model.checkpoint" in err and "corrupt" in err and len(err.strip().splitlines()) == 1


def test_bad_input_through_run_py_has_no_traceback(tmp_path):
    proc = run_cli([*SMOKE, "rank.ratio=0.5", f"paths.cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'o'}"],
                   timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "rank.ratio=0.5" in proc.stderr
    assert not (tmp_path / "o" / "result.json").exists()


def test_a_bad_job_in_a_sweep_leaves_a_failed_row_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(["-m", *SMOKE, "task=benchmark", "rank.ratio=0.5,2", f"paths.cache_dir={tmp_path / 'c'}",
                    f"hydra.sweep.dir={sweep_dir}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank.ratio=0.5" in errors[0]
    df = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(zip(df.rank_ratio, df.status)) == [(0.5, "failed"), (2.0, "ok")]
    assert "rank.ratio=0.5" in df.loc[df.status == "failed", "error"].iloc[0]


def test_a_job_that_fails_exits_non_zero_after_writing_its_row(tmp_path):
    """``python run.py ... && next-step`` must not carry on after a failed job (here: the loss diverges)."""
    proc = run_cli([*SMOKE, "trainer.finetune_optim.lr=1e30", f"paths.cache_dir={tmp_path / 'c'}",
                    f"hydra.run.dir={tmp_path / 'o'}"], timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    row = json.loads((tmp_path / "o" / "result.json").read_text())
    assert row["status"] == "failed" and "non-finite" in row["error"]
    assert "error: the job failed" in proc.stderr and "Traceback" not in proc.stderr.split("error: the job")[-1]


def test_a_sweep_with_a_failed_job_goes_on_and_counts_it(tmp_path):
    sweep_dir = tmp_path / "multirun"
    proc = run_cli(["-m", *SMOKE, "trainer.finetune_optim.lr=0.01,1e30", f"paths.cache_dir={tmp_path / 'c'}",
                    f"hydra.sweep.dir={sweep_dir}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 2 jobs failed" in proc.stderr
    df = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(df.status) == ["failed", "ok"]


def test_a_failed_row_never_replaces_a_finished_one(cfg_factory, tmp_path):
    from lrd_exp import results
    from lrd_exp.tasks.job import write_failed_row

    cfg = cfg_factory([])
    out = tmp_path / "out"
    finished = results.make_row(model="resnet18", status="ok", train_speedup=1.3)
    results.write_result(str(out), finished)
    before = (out / "result.json").read_bytes()
    assert write_failed_row(cfg, "DeviceUnavailableError: no cuda") is None
    assert (out / "result.json").read_bytes() == before
    (out / "result.json").unlink()
    assert write_failed_row(cfg, "DeviceUnavailableError: no cuda") == str(out / "result.json")
    row = results.read_result(str(out / "result.json"))
    assert row["status"] == "failed" and row["error"] == "DeviceUnavailableError: no cuda"


# ------------------------------------------------------------------ 4. numerical faults
def test_nan_loss_fails_the_row_with_reason(cfg_factory, tmp_path, monkeypatch):
    from lrd_exp import tasks
    from lrd_exp.training.classifier import Classifier

    original_step = Classifier.training_step

    def poisoned(self, batch, batch_idx):
        if self.optim.get("lr") == 0.01 and self.global_step >= 1:  # fine-tuning stage only
            x, y = batch
            batch = (x * float("nan"), y)
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "training_step", poisoned)
    cfg = cfg_factory([*SMOKE])
    with pytest.raises(tasks.JobFailed, match="non-finite"):
        tasks.run(cfg)
    row = json.loads((tmp_path / "out" / "result.json").read_text())
    assert row["status"] == "failed"
    assert "non-finite" in row["error"] and "loss" in row["error"]
    # the next job of a sweep still runs
    monkeypatch.setattr(Classifier, "training_step", original_step)
    cfg = cfg_factory([*SMOKE, f"paths.output_dir={tmp_path / 'out2'}"])
    assert tasks.run(cfg) is not None
    assert json.loads((tmp_path / "out2" / "result.json").read_text())["status"] == "ok"


# ------------------------------------------------------------------ 2. killed sweep, re-run
@pytest.mark.slow
def test_killed_sweep_rerun_has_every_row_once(tmp_path):
    sweep = tmp_path / "sweep"
    args = [sys.executable, "run.py", "-m", *SMOKE, "rank.policy=none,quantized,ratio",
            f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 400
    try:
        while time.time() < deadline:  # wait until the first job is done and the second has started
            rows = [json.loads(p.read_text()) for p in sweep.rglob("result.json")]
            if sum(r["status"] == "ok" for r in rows) >= 1 and len(rows) >= 2:
                break
            assert proc.poll() is None, "sweep ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("the first job never finished")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.rglob("result.json"))
    assert "running" in statuses  # the killed job left an unfinished row, not a corrupt file
    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "complete: skipping" in done.stdout + done.stderr
    df = pd.read_csv(sweep / "results.csv")
    assert len(df) == 3 and df.output_dir.is_unique
    assert (df.status == "ok").all()
    assert sorted(df.rank_policy) == ["none", "quantized", "ratio"]


# ------------------------------------------------------------------ 3. concurrent jobs share one baseline
@pytest.mark.slow
def test_concurrent_jobs_train_one_baseline(tmp_path):
    cache = tmp_path / "cache"
    procs = []
    for i, freeze in enumerate(("none", "sequential")):
        args = [sys.executable, "run.py", *SMOKE, f"freeze={freeze}", "trainer.baseline_epochs=2",
                f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path / f'job{i}'}"]
        procs.append(subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    rows = [json.loads((tmp_path / f"job{i}" / "result.json").read_text()) for i in range(2)]
    assert sorted(r["baseline_cache_hit"] for r in rows) == [False, True]
    assert rows[0]["top1_original"] == rows[1]["top1_original"]
    assert len(list((cache / "baselines").glob("*.pt"))) == 1


# ------------------------------------------------------------------ 5. resume
def test_resume_continues_from_last_checkpoint(cfg_factory, tmp_path):
    from lrd_exp import tasks

    base = [*SMOKE, "trainer.max_steps=-1", "trainer.limit_val_batches=1", "dataset.val_fraction=0.9",
            "rank.calibration_images=64",
            "bench.enabled=false"]
    assert tasks.run(cfg_factory([*base, "trainer.finetune_epochs=1"])) is None  # bench off: no metric
    first = json.loads((tmp_path / "out" / "result.json").read_text())
    assert first["status"] == "ok"
    ckpt = tmp_path / "out" / "checkpoints" / "finetune" / "last.ckpt"
    assert ckpt.is_file()
    tasks.run(cfg_factory([*base, "trainer.finetune_epochs=2", "resume=true"]))
    second = json.loads((tmp_path / "out" / "result.json").read_text())
    assert second["status"] == "ok"
    curves = pd.read_csv(tmp_path / "out" / "curves.csv")
    fine = curves[curves.stage == "finetune"]
    assert fine.epoch.tolist() == [1]  # epoch 0 came from the checkpoint, only epoch 1 was trained
