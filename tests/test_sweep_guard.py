"""Sweep launchers (conf/hydra/launcher/*.yaml) and the guard against parallel jobs disturbing throughput."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import CONF_DIR, run_cli
from omegaconf import DictConfig, OmegaConf

from lrd_exp.sweep.guard import (
    PARALLEL_ENV,
    ParallelThroughputGuard,
    launcher_kind,
    parallel_jobs,
    sweep_concurrency,
    sweep_size,
    warn_parallel_throughput,
)

# our joblib.yaml shadows the plugin's structured config of the same name (Hydra merges it as its schema)
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")

GUARD = "++hydra.callbacks.parallel_guard._target_=lrd_exp.sweep.guard.ParallelThroughputGuard"


def compose_hydra(overrides: list[str]) -> DictConfig:
    """The full config, ``hydra`` node included, as ``run.py -m`` composes it."""
    from hydra import compose, initialize_config_dir

    from lrd_exp.cli import prepare

    prepare()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


# --------------------------------------------------------------------------------------------- the configs
@pytest.mark.parametrize("name,kind", [("slurm", "submitit_slurm"), ("local", "submitit_local"), ("joblib", "joblib")])
def test_launcher_configs_compose(name, kind):
    cfg = compose_hydra([f"hydra/launcher={name}", "device=cpu"])
    assert launcher_kind(cfg.hydra.launcher) == kind
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    if kind.startswith("submitit"):
        assert launcher["tasks_per_node"] == 1 and launcher["gpus_per_node"] == 1  # = device.devices
        assert launcher["submitit_folder"].endswith(".submitit/%j")
    if kind == "joblib":
        assert launcher["n_jobs"] == 1


def test_slurm_config_makes_the_sbatch_script(tmp_path: Path, monkeypatch):
    """The SLURM keys reach sbatch as the submitit launcher passes them (no cluster needed)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # pretend srun exists

    cfg = compose_hydra(["hydra/launcher=slurm", "device=cuda", "device.devices=4",
                         "hydra.launcher.partition=gpu", "hydra.launcher.mem_gb=64",
                         "+hydra.launcher.additional_parameters.exclusive=true", f"hydra.sweep.dir={tmp_path}"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    executor = submitit.AutoExecutor(folder=str(tmp_path / ".submitit"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "0")
    for line in ("--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=1", "--cpus-per-task=8",
                 "--mem=64GB", "--time=240", "--nodes=1", "--exclusive", "export PYTHONUNBUFFERED=1"):
        assert line in text, (line, text)


# --------------------------------------------------------------------------------------------- how many at once
def test_sweep_size_counts_discrete_sweeps():
    assert sweep_size(["seed=0,1,2", "model=resnet18,resnet50", "trainer=smoke"]) == 6
    assert sweep_size(["seed=range(0,4)"]) == 4
    assert sweep_size([], {"seed": "0,1"}) == 2
    assert sweep_size(["trainer.finetune_optim.lr=interval(0.001,0.1)"]) is None


@pytest.mark.parametrize("launcher,extra,expected", [
    ("joblib", ["hydra.launcher.n_jobs=4"], 3),      # 3 jobs, 4 workers
    ("joblib", ["hydra.launcher.n_jobs=2"], 2),
    ("joblib", [], 1),                                 # our default: one at a time
    ("local", [], 3),                                  # submitit_local starts every job at once
    ("slurm", [], 1),                                  # one allocation per job
    (None, [], 1),                                     # Hydra's basic launcher: one after the other
])
def test_sweep_concurrency(launcher, extra, expected):
    overrides = ([f"hydra/launcher={launcher}"] if launcher else []) + extra
    cfg = compose_hydra(overrides + ["device=cpu"])
    with_sweep = OmegaConf.merge(cfg, {"hydra": {"overrides": {"task": ["seed=0,1,2"]}}})
    assert sweep_concurrency(with_sweep) == expected


def _sweep_cfg(overrides: list[str], sweep: str = "seed=0,1,2") -> DictConfig:
    cfg = compose_hydra(overrides + ["device=cpu"])
    return OmegaConf.merge(cfg, {"hydra": {"overrides": {"task": [sweep]}}})


def test_guard_warns_when_parallel_jobs_measure_throughput(monkeypatch, capsys):
    monkeypatch.delenv(PARALLEL_ENV, raising=False)
    guard = ParallelThroughputGuard()
    guard.on_multirun_start(_sweep_cfg(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]))
    err = capsys.readouterr().err
    assert "WARNING" in err and "up to 2 jobs" in err and "parallel_jobs" in err
    assert os.environ[PARALLEL_ENV] == "2"
    guard.on_multirun_end(None)
    assert "reminder" in capsys.readouterr().err


def test_guard_is_quiet_for_serial_or_untimed_sweeps(monkeypatch, capsys):
    monkeypatch.delenv(PARALLEL_ENV, raising=False)
    ParallelThroughputGuard().on_multirun_start(_sweep_cfg(["hydra/launcher=joblib"]))  # n_jobs=1
    assert os.environ[PARALLEL_ENV] == "1"
    ParallelThroughputGuard().on_multirun_start(_sweep_cfg(["hydra/launcher=local", "bench.enabled=false"]))
    assert os.environ[PARALLEL_ENV] == "3"  # still recorded in the rows
    assert capsys.readouterr().err == ""


def test_guard_serialize_forces_one_joblib_job(monkeypatch):
    monkeypatch.delenv(PARALLEL_ENV, raising=False)
    cfg = _sweep_cfg(["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"])
    ParallelThroughputGuard(action="serialize").on_multirun_start(cfg)
    assert cfg.hydra.launcher.n_jobs == 1 and os.environ[PARALLEL_ENV] == "1"
    with pytest.raises(RuntimeError, match="cannot be serialized"):
        ParallelThroughputGuard(action="serialize").on_multirun_start(_sweep_cfg(["hydra/launcher=local"]))


def test_guard_error_and_bad_action(monkeypatch):
    monkeypatch.delenv(PARALLEL_ENV, raising=False)
    with pytest.raises(RuntimeError, match="action=error"):
        ParallelThroughputGuard(action="error").on_multirun_start(
            _sweep_cfg(["hydra/launcher=local", "task=benchmark"]))
    with pytest.raises(ValueError, match="warn, serialize, error"):
        ParallelThroughputGuard(action="maybe")


def test_a_single_run_is_never_parallel(monkeypatch, cfg_factory):
    monkeypatch.setenv(PARALLEL_ENV, "4")  # left over from some sweep in this process
    assert parallel_jobs() == 1
    assert warn_parallel_throughput(cfg_factory(["device=cpu"])) == 1


# --------------------------------------------------------------------------------------------- a real sweep
def _local_sweep(tmp_path: Path, *extra: str):
    sweep = tmp_path / "sweep"
    result = run_cli([
        "-m", "hydra/launcher=local", "trainer=smoke", "logger=csv", "device=cpu", "seed=0,1", "model.name=test_resnet",
        "trainer.baseline_epochs=0", "trainer.finetune_epochs=1", "trainer.max_steps=2",
        "trainer.limit_val_batches=0.1", "trainer.enable_progress_bar=false", *extra,
        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.data_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}",
        GUARD,
    ], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (sweep / ".submitit").is_dir()  # really went through submitit
    rows = {}
    for path in sorted(sweep.glob("*/result.json")):
        row = json.loads(path.read_text())
        rows[row["seed"]] = row
    assert sorted(rows) == [0, 1], list(sweep.iterdir())
    for row in rows.values():
        assert row["status"] == "ok", row.get("error")
        assert row["parallel_jobs"] == 2  # submitit_local started both jobs at once
    assert (sweep / "results.csv").is_file()  # aggregated by the sweep callback in the launching process
    return result, rows


def test_submitit_local_sweep_runs_both_jobs(tmp_path: Path):
    """run.py -m hydra/launcher=local: two jobs in two submitit processes at once, both rows written and marked.

    Accuracy-only (bench.enabled=false), so the guard stays quiet; the rows still say how many jobs ran at once.
    """
    result, rows = _local_sweep(tmp_path, "bench.enabled=false")
    assert "WARNING" not in result.stderr
    assert all(row["train_ips_decomposed"] is None for row in rows.values())


@pytest.mark.slow
def test_submitit_local_sweep_with_timing_warns(tmp_path: Path):
    """The same sweep measuring throughput: the guard warns at sweep start and end, the rows are marked."""
    result, rows = _local_sweep(tmp_path, "bench.warmup=1", "bench.steps=2")
    assert "up to 2 jobs" in result.stderr and "reminder" in result.stderr
    assert all(row["train_ips_decomposed"] > 0 for row in rows.values())
