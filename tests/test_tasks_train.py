"""End to end through ``run.py`` (as users run it) and through ``lrd_exp.tasks.run`` in-process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_cli

from lrd_exp.results import RESULT_COLUMNS

pytestmark = pytest.mark.usefixtures("single_thread")

SMOKE = ["trainer=smoke", "logger=csv", "trainer.enable_progress_bar=false"]
FAST_BENCH = ["bench.warmup=1", "bench.steps=2"]  # real measurements, fewer timed steps


def _read(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


def _fail_msg(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Two jobs sharing one cache: sequential freezing in steps (it freezes within the smoke run), then none."""
    tmp = tmp_path_factory.mktemp("cli")
    common = SMOKE + FAST_BENCH + [f"paths.cache_dir={tmp / 'cache'}", f"paths.data_dir={tmp / 'data'}"]
    first = run_cli(common + ["freeze=sequential", "freeze.unit=step", "freeze.warmup=1", "freeze.period=1",
                              "freeze.per_stage=0.5", "freeze.importance=depth", f"hydra.run.dir={tmp / 'run1'}"])
    second = run_cli(common + ["freeze=none", f"hydra.run.dir={tmp / 'run2'}"])
    return {"tmp": tmp, "first": first, "second": second, "dir1": tmp / "run1", "dir2": tmp / "run2"}


def test_cli_job_succeeds_and_writes_the_full_row(cli_runs):
    proc = cli_runs["first"]
    assert proc.returncode == 0, _fail_msg(proc)
    assert "Traceback" not in proc.stderr
    row = _read(cli_runs["dir1"] / "result.json")
    missing = [c for c in RESULT_COLUMNS if c not in row]
    assert not missing, f"result.json lacks {missing}"
    assert row["status"] == "ok", row.get("error")
    assert row["error"] in (None, "")
    # identity
    assert (row["model"], row["dataset"], row["rank_policy"], row["freeze"]) == ("resnet18", "digits", "quantized",
                                                                                   "sequential")
    assert row["rank_ratio"] == 2.0 and row["rank_multiple"] == 8 and row["batch_size"] == 32 and row["seed"] == 0
    assert json.loads(row["rank_params"])["policy"] == "quantized"
    assert json.loads(row["freeze_params"])["unit"] == "step"
    assert "freeze=sequential" in row["overrides"] and "trainer=smoke" in row["overrides"]
    assert row["device_name"] and row["precision"] == "32-true" and row["time"]
    assert Path(row["output_dir"]).resolve() == cli_runs["dir1"].resolve()
    assert row["duration_s"] > 0
    assert row["malloc"] == "system"  # a fresh process: the default leaves the allocator alone (tuned is opt-in)
    assert row["train_ips_probe"] is None  # the between-epoch probe is opt-in too


def test_cli_numbers_agree_with_independent_counts(cli_runs):
    """The row's sizes against counts made here another way; its speeds against its own freeze states; its
    accuracies against the size of the validation set."""
    import timm

    row = _read(cli_runs["dir1"] / "result.json")
    fresh = timm.create_model("resnet18", num_classes=10, in_chans=1)
    assert row["params_original"] == sum(p.numel() for p in fresh.parameters())
    layers = pd.read_csv(cli_runs["dir1"] / "decomposition.csv")
    done = layers[layers.action == "decomposed"]
    assert len(done) > 10
    # parameters counted on the modules == the per-layer report's formulas
    assert row["params_original"] - row["params_decomposed"] == (done.params_before - done.params_after).sum()
    # FLOPs executed under FlopCounterMode == the per-layer analytic counts (forward, one 32 px image)
    assert row["flops_original"] - row["flops_decomposed"] == (done.flops_before - done.flops_after).sum()
    assert 0 < row["train_flops_decomposed"] < row["train_flops_original"]
    for side in ("original", "decomposed"):
        for kind in ("train", "infer"):
            med = row[f"{kind}_ips_{side}"]
            assert med > 0 and math.isfinite(med)
            assert row[f"{kind}_ips_{side}_min"] <= med <= row[f"{kind}_ips_{side}_max"]
    # the schedule's speed is its states' step times weighted by how long each lasts
    stages = row["freeze_stages"]
    assert len(stages) > 1 and sum(s["weight"] for s in stages) == pytest.approx(1.0)
    assert 1 / row["train_ips_decomposed"] == pytest.approx(sum(s["weight"] / s["train_ips"] for s in stages))
    # smoke: 2 validation batches of 32 images, so every top-1 is a whole number of images out of 64
    for key in ("top1_original", "top1_decomposed_pre", "top1_decomposed"):
        assert row[key] * 64 / 100 == pytest.approx(round(row[key] * 64 / 100), abs=1e-6), key
    # the smoke loop is too short for the loop's throughput (its first steps are skipped): both stay empty
    # (tests/test_module.py measures both in a longer real loop)
    assert "train_loop_overhead" in row
    assert row["train_ips_logged"] is None and row["train_loop_overhead"] is None


def test_cli_prints_the_summary_table(cli_runs):
    out = cli_runs["first"].stdout
    assert "LRD result (model=resnet18" in out
    for label in ("params", "forward FLOPs / image", "top-1 % (after fine-tune)", "train images/s", "status: ok",
                  "right after decomposing, against the original on 256 held-out training images: top-1 agreement"):
        assert label in out, label
    assert f"result row: {cli_runs['dir1'] / 'result.json'}" in out


def test_cli_writes_decomposition_and_freeze_history(cli_runs):
    d = cli_runs["dir1"]
    dec = pd.read_csv(d / "decomposition.csv")
    assert {"name", "kind", "action", "ranks", "params_before", "params_after", "rel_error"} <= set(dec.columns)
    decomposed = dec[dec.action == "decomposed"]
    assert len(decomposed) >= 10
    assert (decomposed.params_after < decomposed.params_before).all()
    assert all(int(r) % 8 == 0 for ranks in decomposed.ranks for r in str(ranks).split("x"))
    history = _read(d / "freeze_history.json")
    # unit=step, warmup=1, period=1, per_stage=0.5, final 0.75: half frozen at step 1, three quarters at step 2
    assert [h["t"] for h in history] == [0, 1, 2]
    n = history[0]["n_factors"]
    assert n >= 40  # resnet18: 2-3 factors for each of its 19 decomposed convs
    assert [h["n_frozen"] for h in history] == [0, math.ceil(n / 2), math.floor(0.75 * n)]
    assert all("train_flops_error" not in h for h in history), history[0].get("train_flops_error")
    flops = [h["train_flops_per_step"] for h in history]
    assert flops[0] > flops[1] > flops[2]
    row = _read(d / "result.json")
    assert [s["n_frozen"] for s in row["freeze_stages"]] == [h["n_frozen"] for h in history]


def test_cli_writes_learning_curves(cli_runs):
    """curves.csv: validation accuracy of the baseline and fine-tune stages (convergence: docs/paper.md)."""
    path = cli_runs["dir1"] / "curves.csv"
    assert path.is_file(), "no curves.csv: no validation ran inside fit (trainer.max_steps ended the epoch early?)"
    curves = pd.read_csv(path)
    assert {"stage", "epoch", "step", "val_top1", "train_loss"} <= set(curves.columns)
    assert set(curves.stage) == {"baseline", "finetune"}
    assert curves.val_top1.between(0, 100).all()
    assert curves.train_loss.notna().all()


def test_cli_baseline_is_trained_once_and_reused(cli_runs):
    second = cli_runs["second"]
    assert second.returncode == 0, _fail_msg(second)
    r1, r2 = _read(cli_runs["dir1"] / "result.json"), _read(cli_runs["dir2"] / "result.json")
    assert r2["status"] == "ok" and r2["freeze"] == "none"
    assert r1["baseline_cache_hit"] is False and r2["baseline_cache_hit"] is True
    assert r1["baseline_path"] == r2["baseline_path"]
    assert len(list((cli_runs["tmp"] / "cache" / "baselines").glob("*.pt"))) == 1
    assert r1["top1_original"] == r2["top1_original"]  # the very same baseline
    # freezing shows in the time-weighted training FLOPs of the same decomposed model
    assert r1["params_decomposed"] == r2["params_decomposed"]
    assert r1["train_flops_decomposed"] < r2["train_flops_decomposed"]


@pytest.mark.parametrize("override,needles", [
    ("rank.ratio=0.5", ["rank.ratio=0.5", "> 1"]),
    ("model.name=resnt18", ["model.name", "resnt18", "resnet18"]),
])
def test_cli_bad_input_is_one_line_without_traceback(tmp_path, override, needles):
    run_dir = tmp_path / "run"
    proc = run_cli(SMOKE + [override, f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0]
    assert not (run_dir / "result.json").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.pt"))


def test_cli_bad_enum_names_key_and_choices(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(SMOKE + ["rank.policy=bogus", f"hydra.run.dir={run_dir}"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "rank.policy" in proc.stderr and "bogus" in proc.stderr
    assert "none, ratio, energy, quantized, optimized, fixed" in proc.stderr
    assert not (run_dir / "result.json").exists()


# ------------------------------------------------------------------ in-process: tasks.run(cfg)
def test_pipeline_run_in_process(cfg_factory, tmp_path):
    from lrd_exp import tasks

    cfg = cfg_factory(SMOKE + FAST_BENCH)
    value = tasks.run(cfg)
    out = tmp_path / "out"
    row = _read(out / "result.json")
    assert row["status"] == "ok", row.get("error")
    assert not [c for c in RESULT_COLUMNS if c not in row]
    assert row["output_dir"] == str(out)
    # digits is real data: the factors were fitted to 256 training images (rank.fit=auto), BN re-estimated
    assert row["fit"] == "activations" and row["calibration_images"] == 256
    assert 0 < row["calibration_s"] <= row["decompose_s"]
    assert "output_error" in (out / "decomposition.txt").read_text()
    # the end-to-end check: 256 further training images (not the calibration ones), no labels
    assert row["check_images"] == 256 and row["check_held_out"] is True
    assert 0 <= row["check_agreement"] <= 1 and row["check_kl"] >= 0 and row["check_rel_error"] >= 0
    assert row["bn_recalibration"] in ("kept", "rejected")
    assert "against the original: agreement" in (out / "decomposition.txt").read_text()
    assert row["baseline_cache_hit"] is False
    assert row["channels_last"] is False
    from lrd_exp.devices.allocator import malloc_mode

    assert row["malloc"] == malloc_mode()  # what this process runs under (another test may have tuned it)
    assert value == pytest.approx(row["train_ips_decomposed"]) and value > 0  # the sweep objective
    assert (out / "decomposition.csv").is_file()
    assert list((tmp_path / "cache" / "baselines").glob("*.pt"))
    assert not (out / "wandb").exists()  # logger.wandb.enabled=false
    # a complete row is not recomputed: the job is skipped and returns the same objective
    mtime = (out / "result.json").stat().st_mtime_ns
    assert tasks.run(cfg) == pytest.approx(value)
    assert (out / "result.json").stat().st_mtime_ns == mtime


def test_pipeline_run_rejects_bad_config_before_writing(cfg_factory, tmp_path):
    from lrd_exp import tasks
    from lrd_exp.config.validate import ConfigError

    with pytest.raises(ConfigError, match="rank.multiple"):
        tasks.run(cfg_factory(SMOKE + ["rank.multiple=0"]))
    assert not (tmp_path / "out" / "result.json").exists()
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ a sweep
@pytest.mark.slow
def test_cli_multirun_aggregates_and_shares_the_baseline(tmp_path):
    sweep = tmp_path / "sweep"
    cache = tmp_path / "cache"
    proc = run_cli(["-m"] + SMOKE + ["rank.policy=none,quantized", "freeze=none,sequential",
                                     f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}"], timeout=1200)
    assert proc.returncode == 0, _fail_msg(proc)
    assert len(list(sweep.glob("*/result.json"))) == 4
    df = pd.read_csv(sweep / "results.csv")
    assert len(df) == 4
    assert (df.status == "ok").all(), df[["overrides", "status", "error"]]
    assert set(zip(df.rank_policy, df.freeze)) == {("none", "none"), ("none", "sequential"),
                                                   ("quantized", "none"), ("quantized", "sequential")}
    assert len(list((cache / "baselines").glob("*.pt"))) == 1
    hits = df.baseline_cache_hit.astype(str).str.lower()
    assert (hits == "false").sum() == 1 and (hits == "true").sum() == 3
    assert (sweep / "results.md").is_file()
    none = df[df.rank_policy == "none"]
    quant = df[df.rank_policy == "quantized"]
    assert (none.params_decomposed == none.params_original).all()
    assert (quant.params_decomposed < quant.params_original).all()
    assert df.top1_original.nunique() == 1  # one baseline for all four


# ------------------------------------------------------------------ the module's learning curve
def test_classifier_curve_has_this_epochs_train_loss():
    """curves.csv's train_loss of epoch e must be the mean loss of epoch e (not e-1, not missing)."""
    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lrd_exp.training.classifier import Classifier

    class Losses(pl.Callback):
        def __init__(self):
            self.by_epoch = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.by_epoch.setdefault(trainer.current_epoch, []).append(float(outputs["loss"]))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 12, generator=g), torch.randint(0, 4, (32,), generator=g))
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    module = Classifier(model, 4, optim={"name": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0,
                                         "scheduler": "none"})
    losses = Losses()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[losses])
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert [c["epoch"] for c in module.curve] == [0, 1, 2]
    assert [c["step"] for c in module.curve] == [4, 8, 12]
    for c in module.curve:
        expected = sum(losses.by_epoch[c["epoch"]]) / len(losses.by_epoch[c["epoch"]])
        assert c["train_loss"] == pytest.approx(expected, rel=1e-5), (c, expected)
        assert 0 <= c["val_top1"] <= 100


def test_git_commit_is_dirty_only_for_code_changes(tmp_path):
    import subprocess

    from lrd_exp.tasks.identity import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "lrd_exp").mkdir()
    (tmp_path / "results").mkdir()
    (tmp_path / "lrd_exp" / "m.py").write_text("x = 1\n")
    (tmp_path / "results" / "t.md").write_text("old\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(str(tmp_path))
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "results" / "t.md").write_text("a table written by an earlier job\n")
    assert git_commit(str(tmp_path)) == clean  # results do not change what runs
    (tmp_path / "lrd_exp" / "m.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)) == clean + "-dirty"


def test_pipeline_pairs_the_loop_with_the_probe(cfg_factory, tmp_path):
    """A fine-tuning epoch long enough to measure: the row carries the probe and the paired fidelity."""
    from lrd_exp import tasks

    cfg = cfg_factory(SMOKE + FAST_BENCH + ["trainer.baseline_epochs=0", "trainer.finetune_epochs=1",
                                            "trainer.max_steps=-1", "bench.probe_steps=3", "freeze=none",
                                            "dataset.val_fraction=0.8"])  # ~11 training steps
    tasks.run(cfg)
    row = _read(tmp_path / "out" / "result.json")
    assert row["status"] == "ok", row.get("error")
    assert row["train_ips_logged"] > 0 and row["train_ips_probe"] > 0
    assert row["train_ips_fidelity_paired"] == pytest.approx(row["train_ips_logged"] / row["train_ips_probe"],
                                                             rel=0.05)
    assert 0.2 < row["train_ips_fidelity_paired"] < 5
    per_epoch = pd.read_csv(tmp_path / "out" / "fidelity.csv")
    assert list(per_epoch.epoch) == [0] and per_epoch.probe_start_step_s.notna().all()
    # off: by request, without a benchmark, or under DDP (each rank would time alone)
    from lrd_exp.devices import resolve_device
    from lrd_exp.tasks.train import make_probe

    dm, cpu = object(), resolve_device("cpu")
    for extra in (["bench.probe_steps=0"], ["bench.enabled=false"], ["device.devices=2"]):
        assert make_probe(cfg_factory(SMOKE + extra), cpu, dm) is None, extra


def test_the_jobs_model_file_loads_in_a_fresh_process_and_scores_the_rows_top1(cli_runs):
    """model.pt is the product: rebuilt by load_decomposed alone, it gets the row's top-1 on the same images."""
    import subprocess
    import sys

    row = _read(cli_runs["dir1"] / "result.json")
    code = """
import sys, torch
from lrd_exp import load_decomposed
from lrd_exp.training.data import build_datamodule
model = load_decomposed(sys.argv[1])
dm = build_datamodule({"name": "digits", "image_size": 32, "in_chans": 1}, batch_size=32, seed=0)
right = seen = 0
for i, (x, y) in enumerate(dm.val_dataloader()):
    if i == 2:  # trainer=smoke validates on 2 batches
        break
    with torch.no_grad():
        right += int((model(x).argmax(1) == y).sum()); seen += len(y)
print(100.0 * right / seen)
"""
    out = subprocess.run([sys.executable, "-c", code, str(cli_runs["dir1"] / "model.pt")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.strip()) == pytest.approx(row["top1_decomposed"], abs=1e-6)


def test_evaluate_and_keep_training_from_the_model_file(cli_runs):
    """``task=evaluate model.checkpoint=model.pt`` reports the same top-1 and the loaded model's speed; a training
    job started from the file fine-tunes it without decomposing again."""
    tmp, model_pt = cli_runs["tmp"], cli_runs["dir1"] / "model.pt"
    row = _read(cli_runs["dir1"] / "result.json")
    common = SMOKE + FAST_BENCH + [f"paths.cache_dir={tmp / 'cache'}", f"model.checkpoint={model_pt}"]
    proc = run_cli(common + ["task=evaluate", f"hydra.run.dir={tmp / 'eval'}"])
    assert proc.returncode == 0, _fail_msg(proc)
    ev = _read(tmp / "eval" / "result.json")
    assert ev["task"] == "evaluate" and ev["status"] == "ok"
    assert ev["top1_decomposed"] == pytest.approx(row["top1_decomposed"], abs=1e-6)
    assert ev["infer_ips_decomposed"] > 0 and ev["latency_ms_decomposed"] > 0
    assert ev["params_decomposed"] == row["params_decomposed"]
    proc = run_cli(common + ["freeze=none", f"hydra.run.dir={tmp / 'again'}"])
    assert proc.returncode == 0, _fail_msg(proc)
    again = _read(tmp / "again" / "result.json")
    assert again["status"] == "ok" and again["top1_original"] is None
    assert again["top1_decomposed_pre"] == pytest.approx(row["top1_decomposed"], abs=1e-6)
    assert again["params_decomposed"] == row["params_decomposed"]
    assert (tmp / "again" / "decomposition.txt").read_text().startswith(f"loaded from {model_pt}")
    assert not (tmp / "again" / "decomposition.csv").exists()


def test_the_row_has_the_deployed_speed_latency_and_memory(cli_runs):
    row = _read(cli_runs["dir1"] / "result.json")
    assert row["infer_ips_deployed"] > 0 and 0 <= row["layers_merged"] <= len(row["merge_report"])
    assert row["infer_speedup_deployed"] == pytest.approx(row["infer_ips_deployed"] / row["infer_ips_original"])
    for side in ("original", "decomposed", "deployed"):
        assert 0 < row[f"latency_ms_{side}"] <= row[f"latency_ms_{side}_p90"]
    assert row["train_mem_kind"] == "counted"
    stages = row["freeze_stages"]
    assert row["train_mem_mb_decomposed"] == max(s["train_mem_mb"] for s in stages)
    # freezing factors removes their gradients and optimizer state: the most frozen state needs the least
    most_frozen = max(stages, key=lambda s: s["n_frozen"])
    assert most_frozen["train_mem_mb"] < row["train_mem_mb_decomposed"]
