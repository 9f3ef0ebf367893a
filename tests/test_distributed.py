"""Several devices per job: freeze-aware DDP (a real 2-process CPU fit over gloo) and how the strategy is chosen."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrd_exp.decompose import decompose_model
from lrd_exp.devices import DeviceInfo
from lrd_exp.distributed.ddp import FreezeAwareDDPStrategy, ddp_strategy, trainable_signature
from lrd_exp.freezing import FreezingCallback, collect_factors

sys.path.insert(0, str(REPO / "experiments"))  # the DDP diagnostics live with the experiments
from ddp_freeze_bench import ReplicaStateDump, StepTimer, compare_replicas  # noqa: E402

from lrd_exp.config.validate import ConfigError
from lrd_exp.training.classifier import Classifier

CPU = DeviceInfo("cpu", torch.device("cpu"), "test cpu")
FREEZE = {"schedule": "sequential", "unit": "step", "warmup": 2, "period": 2, "per_stage": 2,
          "final_fraction": 0.75, "importance": "weight_change"}
STEPS = 10


def tiny_decomposed() -> nn.Module:
    """Stem conv, a 3x3 conv (Tucker-2: first/core/last), two linears (SVD: first/last), head: 7 factors."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
    decompose_model(model, policy="fixed", rank=4, example_input=torch.randn(1, 3, 8, 8))
    return model


# --------------------------------------------------------------------------------------------- the real thing
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fit the tiny decomposed model on 2 CPU ranks (gloo, spawned) with sequential freezing every 2 steps."""
    tmp = tmp_path_factory.mktemp("ddp")
    model = tiny_decomposed()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    x, y = torch.randn(2 * 8 * STEPS, 3, 8, 8), torch.randint(0, 10, (2 * 8 * STEPS,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    strategy = ddp_strategy(CPU, 2, "ddp")
    freezer = FreezingCallback(FREEZE)  # FLOP logging on: it runs a backward outside DDP at stage changes
    timer = StepTimer()
    module = Classifier(model, 10, optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01,
                                          "scheduler": "none"})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp),
                         callbacks=[timer, freezer, ReplicaStateDump(str(tmp / "dumps"), timer=timer)])
    trainer.fit(module, train_dataloaders=loader)
    return {"tmp": tmp, "initial": initial, "module": module, "freezer": freezer, "trainer": trainer, "timer": timer,
            "dumps": sorted(str(p) for p in (tmp / "dumps").glob("rank*.pt"))}


def test_ddp_freezing_keeps_frozen_factors_bit_identical_on_every_rank(ddp_run):
    assert len(ddp_run["dumps"]) == 2
    report = compare_replicas(ddp_run["dumps"])
    assert report["ranks"] == [0, 1]
    assert report["same_frozen_sets"]
    # 7 factors, 2 per stage, floor(0.75 * 7) = 5 frozen at the end: 5 factor weights (biases keep training)
    assert len(report["frozen"]) == 5, report["frozen"]
    assert all(".first." in n or ".core." in n or ".last." in n for n in report["frozen"])
    assert report["frozen_changed"] == [], "a frozen factor moved after it was frozen (momentum / weight decay?)"
    assert report["mismatched"] == [], "ranks disagree on some parameter"


def test_ddp_freezing_trains_and_rewraps_at_each_stage(ddp_run):
    rank0 = torch.load(ddp_run["dumps"][0], weights_only=False)
    # the trainable ones did train, identically on both ranks (checked above)
    moved = [n for n, v in rank0["final"].items()
             if n not in rank0["frozen_at"] and not torch.equal(v, ddp_run["initial"][n.removeprefix("model.")])]
    assert len(moved) >= len(rank0["final"]) - len(rank0["frozen_at"]) - 1
    # one wrap at setup, then one per freeze stage (steps 2, 4, 6), each over fewer trainable tensors
    steps = [r["step"] for r in rank0["rewraps"]]
    counts = [r["trainable_tensors"] for r in rank0["rewraps"]]
    assert steps == [-1, 2, 4, 6], rank0["rewraps"]
    assert counts == sorted(counts, reverse=True) and counts[-1] == counts[0] - 5
    assert rank0["n_trainable"][-1] == counts[-1]


def test_spawned_fit_results_come_back_to_the_job(ddp_run):
    """Weights, freeze history and re-wraps of rank 0 are in the calling process after fit (the pipeline needs them)."""
    rank0 = torch.load(ddp_run["dumps"][0], weights_only=False)
    module, freezer = ddp_run["module"], ddp_run["freezer"]
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), rank0["final"][name]), name
    assert [h["n_frozen"] for h in freezer.history] == [0, 2, 4, 5]
    assert all("train_flops_per_step" in h for h in freezer.history)
    assert len(freezer.frozen) == 5
    assert [r["step"] for r in ddp_run["trainer"].strategy.rewraps] == [-1, 2, 4, 6]
    assert len(ddp_run["timer"].times) == STEPS  # plain-data attributes of the project's callbacks come back
    assert ddp_run["timer"].times == rank0["step_times"]


# --------------------------------------------------------------------------------------------- choosing the strategy
def test_single_device_keeps_the_configured_strategy():
    assert ddp_strategy(CPU, 1, "auto") == "auto"
    assert ddp_strategy(CPU, "1", "auto") == "auto"


@pytest.mark.parametrize("name,start", [("auto", "spawn"), ("ddp", "spawn"), ("ddp_spawn", "spawn"),
                                        ("ddp_freeze", "spawn"), ("ddp_fork", "fork")])
def test_ddp_names_get_the_freeze_aware_strategy(name, start):
    strategy = ddp_strategy(CPU, 2, name)
    assert isinstance(strategy, FreezeAwareDDPStrategy)
    assert strategy._start_method == start
    assert not strategy._ddp_kwargs.get("find_unused_parameters", False)


def test_other_strategies_pass_through():
    assert ddp_strategy(CPU, 2, "ddp_find_unused_parameters_true") == "ddp_find_unused_parameters_true"
    custom = FreezeAwareDDPStrategy(start_method="fork")
    assert ddp_strategy(CPU, 2, custom) is custom


def test_npu_ddp_uses_hccl():
    npu = DeviceInfo("npu", torch.device("cpu"), "fake npu")
    strategy = ddp_strategy(npu, 2, "auto")
    assert isinstance(strategy, FreezeAwareDDPStrategy) and strategy.process_group_backend == "hccl"


def test_multi_node_and_external_launch_fail_with_a_hint(monkeypatch):
    with pytest.raises(ConfigError, match="num_nodes"):
        ddp_strategy(CPU, 2, "ddp", num_nodes=2)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "lrd")
    with pytest.raises(ConfigError, match="tasks_per_node=1"):
        ddp_strategy(CPU, 2, "ddp")
    cuda = DeviceInfo("cuda", torch.device("cpu"), "fake")
    monkeypatch.delenv("SLURM_NTASKS")
    with pytest.raises(ConfigError, match="fork"):
        ddp_strategy(cuda, 2, "ddp_fork")


def test_registry_name():
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_freeze", logger=False)
    assert isinstance(trainer.strategy, FreezeAwareDDPStrategy)


def test_trainable_signature_follows_freezing():
    model = tiny_decomposed()
    before = trainable_signature(model)
    factors = collect_factors(model)
    from lrd_exp.freezing import set_frozen

    set_frozen(factors, factors[:2])
    after = trainable_signature(model)
    assert before != after and sum(before) - sum(after) == 2


def test_tiny_model_pickles_for_spawn():
    """Spawned workers get the model by pickle: decomposed layers must survive it."""
    import pickle

    model = tiny_decomposed()
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(clone(x), model(x))


def test_plain_ddp_fails_when_a_factor_freezes(tmp_path: Path):
    """Why the strategy exists: Lightning's DDP + freezing stops with DDP's unused-parameter error."""
    from lightning_fabric.plugins.environments import LightningEnvironment
    from pytorch_lightning.strategies import DDPStrategy

    model = tiny_decomposed()
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    trainer = pl.Trainer(accelerator="cpu", devices=2, max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         strategy=DDPStrategy(start_method="spawn", cluster_environment=LightningEnvironment()),
                         callbacks=[FreezingCallback(FREEZE, log_flops=False)], default_root_dir=str(tmp_path))
    with pytest.raises(Exception, match="unused parameters|finished reduction"):  # noqa: B017
        trainer.fit(Classifier(model, 10), train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))


def test_a_failing_worker_gives_one_line(tmp_path: Path):
    """A worker's exception reaches the job as one line (it ends up in the result row), not a traceback dump."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ddp_strategy(CPU, 2, "ddp"), max_steps=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"^DDP worker \d failed: .*NonFiniteLossError: non-finite training loss"):
        trainer.fit(Classifier(model, 10), train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))
