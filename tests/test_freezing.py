"""Freeze schedules and the freezing callback: a frozen factor gets no gradient and no optimizer update."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrd_exp import decompose_model
from lrd_exp.decompose import SVDLinear
from lrd_exp.freezing import FreezeSchedule, FreezingCallback, collect_factors, set_frozen
from lrd_exp.training.classifier import Classifier

pytestmark = pytest.mark.usefixtures("single_thread")

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


# ------------------------------------------------------------------ a small decomposed model
def make_model(seed: int = 0) -> nn.Sequential:
    """Two Tucker-2 convs, one SVD 1x1 conv and two SVD linears: 12 factors, in this depth order:

    0.first 0.core 0.last | 3.first 3.core 3.last | 5.first 5.last | 9.first 9.last | 11.first 11.last
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    report = decompose_model(model, policy="ratio", ratio=2, skip_stem=False, skip_head=False)
    assert len(report.decomposed) == 5
    return model


KEYS = ["0.first", "0.core", "0.last", "3.first", "3.core", "3.last", "5.first", "5.last",
        "9.first", "9.last", "11.first", "11.last"]


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def factors(model):
    fs = collect_factors(model)
    assert [f.key for f in fs] == KEYS
    return fs


def batch(n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def make_optimizer(model: nn.Module, name: str):
    """The optimizer the library builds for fine-tuning (every parameter, frozen or not)."""
    optim = {"name": name, "lr": 0.1 if name == "sgd" else 0.01, "momentum": 0.9, "weight_decay": 1e-2,
             "scheduler": "none"}
    opt = Classifier(model, 10, optim=optim).configure_optimizers()
    assert isinstance(opt, torch.optim.SGD if name == "sgd" else torch.optim.AdamW)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    return opt


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 1, set_to_none: bool = True) -> None:
    model.train()
    for i in range(n):
        x, y = batch(seed=seed + i)
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def weights(factors):
    return {f.key: f.module.weight.detach().clone() for f in factors}


def by_key(factors, keys):
    d = {f.key: f for f in factors}
    return [d[k] for k in keys]


# ------------------------------------------------------------------ (a) frozen weights never change
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_factors_are_bit_identical_and_get_no_grad(model, factors, optimizer):
    frozen = by_key(factors, ["0.core", "3.core", "5.last", "9.first", "11.last"])
    set_frozen(factors, frozen)
    before = weights(factors)
    biases = {f.key: f.module.bias.detach().clone() for f in factors if f.module.bias is not None}
    bn = model[1].weight.detach().clone()
    opt = make_optimizer(model, optimizer)
    train_steps(model, opt, 5)
    frozen_keys = {f.key for f in frozen}
    for f in factors:
        w = f.module.weight
        if f.key in frozen_keys:
            assert not w.requires_grad
            assert w.grad is None, f"{f.key}: a frozen weight must not get a gradient"
            assert torch.equal(w.detach(), before[f.key]), f"{f.key} moved while frozen"
            assert w not in opt.state or not opt.state[w], f"{f.key}: the optimizer kept state for a frozen weight"
        else:
            assert w.requires_grad and w.grad is not None
            assert not torch.equal(w.detach(), before[f.key]), f"{f.key} did not train"
        if f.module.bias is not None:  # biases stay trainable by default (freeze_bias=false)
            assert f.module.bias.requires_grad
            assert not torch.equal(f.module.bias.detach(), biases[f.key]), f"{f.key} bias did not train"
    assert not torch.equal(model[1].weight.detach(), bn), "BatchNorm must keep training"


def test_freeze_bias_freezes_the_bias_too(model, factors):
    frozen = by_key(factors, ["5.last", "11.last"])
    set_frozen(factors, frozen, with_bias=True)
    before = {f.key: f.module.bias.detach().clone() for f in frozen}
    opt = make_optimizer(model, "sgd")
    train_steps(model, opt, 3)
    for f in frozen:
        assert not f.module.bias.requires_grad and f.module.bias.grad is None
        assert torch.equal(f.module.bias.detach(), before[f.key])
    # unfreezing (with_bias) gives both back to the optimizer
    set_frozen(factors, [], with_bias=True)
    train_steps(model, opt, 2, seed=10)
    for f in frozen:
        assert f.module.weight.requires_grad and f.module.bias.requires_grad
        assert not torch.equal(f.module.bias.detach(), before[f.key])


# ------------------------------------------------------------------ (b) momentum must not keep moving it
@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad-none", "zero_grad-zeros"])
@pytest.mark.parametrize("optimizer,buffer", [("sgd", "momentum_buffer"), ("adamw", "exp_avg")])
def test_factor_frozen_mid_training_stops_despite_momentum(model, factors, optimizer, buffer, set_to_none):
    # zero_grad(set_to_none=False) keeps a zero .grad on every weight that had one: a frozen weight with a zero
    # grad would still get momentum and weight decay, so freezing must drop the grad itself
    opt = make_optimizer(model, optimizer)
    train_steps(model, opt, 4, set_to_none=set_to_none)  # momentum / Adam moments build up for every weight
    frozen = by_key(factors, ["3.core", "9.last", "0.first"])
    for f in frozen:  # the test could fail: there IS a moment that would keep moving it
        assert opt.state[f.module.weight][buffer].abs().sum() > 0
    set_frozen(factors, frozen)
    at_freeze = weights(factors)
    train_steps(model, opt, 5, seed=20, set_to_none=set_to_none)
    after = weights(factors)
    for f in factors:
        if f in frozen:
            assert f.module.weight.grad is None
            assert torch.equal(after[f.key], at_freeze[f.key]), f"{f.key} kept moving after it was frozen"
        else:
            assert not torch.equal(after[f.key], at_freeze[f.key])
    # thawed again, it trains again (alternating schedules rely on this)
    set_frozen(factors, [])
    train_steps(model, opt, 2, seed=40)
    assert all(not torch.equal(f.module.weight.detach(), at_freeze[f.key]) for f in frozen)


# ------------------------------------------------------------------ (c) sequential schedule
def seq(factors, **kw):
    cfg = {"schedule": "sequential", "unit": "epoch", "warmup": 0, "period": 1, "per_stage": 1,
           "final_fraction": 1.0, "importance": "depth"}
    cfg.update(kw)
    return FreezeSchedule(cfg, factors)


def frozen_counts(schedule, total):
    frozen, counts = [], []
    for t in range(total):
        new = schedule.frozen_at(t, already=frozen)
        assert {f.key for f in frozen} <= {f.key for f in new}, f"t={t}: an already-frozen factor was thawed"
        frozen = new
        counts.append(len(frozen))
    return counts


@pytest.mark.parametrize("kw,expected", [
    # count per stage: warmup 2, every 3 units 2 more, up to half of the 12 factors
    ({"warmup": 2, "period": 3, "per_stage": 2, "final_fraction": 0.5}, [0, 0, 2, 2, 2, 4, 4, 4, 6, 6, 6, 6, 6]),
    # fraction per stage: ceil(0.25 * 12) = 3, final floor(0.75 * 12) = 9
    ({"warmup": 1, "period": 1, "per_stage": 0.25, "final_fraction": 0.75}, [0, 3, 6, 9, 9, 9]),
    # the final fraction caps the last stage: floor(0.6 * 12) = 7
    ({"warmup": 0, "period": 2, "per_stage": 3, "final_fraction": 0.6}, [3, 3, 6, 6, 7, 7, 7, 7]),
    # positions restrict the candidates: 10 non-core factors, ceil(2.5) = 3 per stage, floor(7.5) = 7 at the end
    ({"warmup": 1, "per_stage": 0.25, "final_fraction": 0.75, "positions": ["first", "last"]},
     [0, 3, 6, 7, 7]),
    # nothing to freeze at the end: never freezes
    ({"warmup": 0, "final_fraction": 0.0}, [0, 0, 0]),
])
def test_sequential_frozen_counts(factors, kw, expected):
    s = seq(factors, **kw)
    counts = frozen_counts(s, len(expected))
    assert counts == expected
    assert counts == sorted(counts)  # monotone
    for t, n in enumerate(expected):
        assert len(s.frozen_at(t)) == n
    if "positions" in kw:
        assert all(f.position != "core" for f in s.frozen_at(100))


def test_sequential_in_steps_is_the_same_schedule(factors):
    # the unit only says what t counts; the schedule's arithmetic is the same
    s = seq(factors, unit="step", warmup=5, period=10, per_stage=4, final_fraction=1.0)
    assert s.unit == "step"
    assert [len(s.frozen_at(t)) for t in (0, 4, 5, 14, 15, 24, 25, 34, 35, 1000)] == [0, 0, 4, 4, 8, 8, 12, 12, 12, 12]
    assert s.n_stages == 4


@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize("per_stage,final_fraction", [(1, 1.0), (3, 0.5), (0.25, 0.75), (5, 1.0), (2, 0.0)])
def test_n_stages_counts_the_states_the_timeline_goes_through(factors, warmup, per_stage, final_fraction):
    """Without warm-up the all-trainable stage never happens: it is not a stage."""
    s = seq(factors, warmup=warmup, period=2, per_stage=per_stage, final_fraction=final_fraction)
    segments = s.timeline(200)
    assert len({tuple(f.key for f in fz) for _, _, fz in segments}) == len(segments) == s.n_stages
    assert (len(segments[0][2]) == 0) == (warmup > 0 or final_fraction == 0)


def test_already_frozen_stay_frozen_when_the_order_changes(factors):
    s = seq(factors, per_stage=2)
    first = s.frozen_at(0, order=factors)
    assert [f.key for f in first] == ["0.first", "0.core"]
    second = s.frozen_at(1, order=list(reversed(factors)), already=first)
    assert [f.key for f in second] == ["0.first", "0.core", "11.last", "11.first"]
    third = s.frozen_at(2, order=factors, already=second)
    assert [f.key for f in third] == ["0.first", "0.core", "11.last", "11.first", "0.last", "3.first"]


@pytest.mark.parametrize("importance,expected", [
    ("depth", ["0.first", "0.core", "0.last", "3.first"]),
    ("reverse_depth", ["11.last", "11.first", "9.last", "9.first"]),
    ("size", ["3.core", "9.last", "3.last", "9.first"]),  # numel 1521, 640, 416, 320
    # measured signals have no measurement outside the callback: depth order
    ("weight_change", ["0.first", "0.core", "0.last", "3.first"]),
])
def test_static_importance_order(factors, importance, expected):
    s = seq(factors, importance=importance, per_stage=4)
    assert [f.key for f in s.frozen_at(0)] == expected
    by_size = sorted(factors, key=lambda f: -f.module.weight.numel())
    if importance == "size":
        assert [f.key for f in s.static_order()][:4] == [f.key for f in by_size[:4]]


# ------------------------------------------------------------------ (d) alternating
def test_alternating_switches_phase_every_period(factors):
    s = FreezeSchedule({"schedule": "alternating", "unit": "step", "warmup": 1, "period": 2,
                        "phases": [["last"], ["first", "core"]]}, factors)
    expected_phase = [-1, 0, 0, 1, 1, 0, 0, 1, 1]
    assert [s.phase_at(t) for t in range(9)] == expected_phase
    for t, phase in enumerate(expected_phase):
        frozen = {f.key for f in s.frozen_at(t)}
        trainable = {f.key for f in factors} - frozen
        if phase == -1:
            assert not frozen
        elif phase == 0:
            assert trainable == {k for k in KEYS if k.endswith(".last")}
        else:
            assert trainable == {k for k in KEYS if k.endswith((".first", ".core"))}


def test_alternating_three_phases(factors):
    s = FreezeSchedule({"schedule": "alternating", "warmup": 0, "period": 1,
                        "phases": [["first"], ["core"], ["last"]]}, factors)
    for t, pos in enumerate(["first", "core", "last", "first"]):
        trainable = {f.key for f in factors} - {f.key for f in s.frozen_at(t)}
        assert trainable == {k for k in KEYS if k.endswith("." + pos)}
    # SVD layers have no core: in the core phase all their factors are frozen
    assert {"5.first", "5.last", "9.first", "9.last"} <= {f.key for f in s.frozen_at(1)}


# ------------------------------------------------------------------ (e) static ablations
@pytest.mark.parametrize("name,expected", [
    ("first", ["0.first", "3.first", "5.first", "9.first", "11.first"]),
    ("last", ["0.last", "3.last", "5.last", "9.last", "11.last"]),
    ("largest", ["0.core", "3.core", "5.first", "9.last", "11.first"]),
    ("none", []),
])
def test_static_schedules(factors, name, expected):
    s = FreezeSchedule({"schedule": name, "warmup": 0}, factors)
    for t in (0, 3, 50):
        assert sorted(f.key for f in s.frozen_at(t)) == sorted(expected)
    if name == "largest":  # the largest factor of each layer, recomputed here
        layers = {}
        for f in factors:
            layers.setdefault(f.layer, []).append(f)
        for layer, fs in layers.items():
            big = max(f.module.weight.numel() for f in fs)
            chosen = [k for k in expected if k.startswith(layer + ".")]
            assert len(chosen) == 1 and by_key(factors, chosen)[0].module.weight.numel() == big


# ------------------------------------------------------------------ (f) timeline
@pytest.mark.parametrize("cfg,total,expected", [
    ({"schedule": "sequential", "warmup": 2, "period": 3, "per_stage": 2, "final_fraction": 0.5}, 12,
     [(0, 2, 0), (2, 3, 2), (5, 3, 4), (8, 4, 6)]),
    ({"schedule": "sequential", "warmup": 2, "period": 3, "per_stage": 2, "final_fraction": 0.5}, 4,
     [(0, 2, 0), (2, 2, 2)]),
    ({"schedule": "alternating", "warmup": 1, "period": 2, "phases": [["last"], ["first", "core"]]}, 6,
     [(0, 1, 0), (1, 2, 7), (3, 2, 5), (5, 1, 7)]),
    ({"schedule": "largest", "warmup": 0}, 7, [(0, 7, 5)]),
    ({"schedule": "none"}, 3, [(0, 3, 0)]),
    ({"schedule": "sequential", "warmup": 0, "per_stage": 1}, 1, [(0, 1, 1)]),
])
def test_timeline(factors, cfg, total, expected):
    cfg = {"importance": "depth", **cfg}
    segments = FreezeSchedule(cfg, factors).timeline(total)
    assert [(s, n, len(fz)) for s, n, fz in segments] == expected
    assert sum(n for _, n, _ in segments) == total
    starts = [s for s, _, _ in segments]
    assert starts == [0] + [s + n for s, n, _ in segments[:-1]]  # contiguous
    if cfg["schedule"] == "sequential":  # nested: each stage keeps the previous stage's factors
        for (_, _, a), (_, _, b) in zip(segments, segments[1:]):
            assert [f.key for f in a] == [f.key for f in b][:len(a)]


def test_bad_schedule_values_raise(factors):
    for bad, key in ([{"period": 0}, "freeze.period"], [{"warmup": -1}, "freeze.warmup"],
                     [{"positions": ["middle"]}, "middle"], [{"schedule": "bogus"}, "freeze.schedule"],
                     [{"importance": "random"}, "freeze.importance"], [{"phases": [[]]}, "freeze.phases"]):
        with pytest.raises(ValueError, match=key):
            FreezeSchedule({"schedule": "sequential", **bad}, factors)


# ------------------------------------------------------------------ (g) the callback in a real Trainer
class Recorder(pl.Callback):
    """Weights of every factor at the start of each step (after the freezing callback ran) and at the end."""

    def __init__(self):
        self.at_step: dict[int, dict[str, torch.Tensor]] = {}
        self.requires_grad: dict[int, dict[str, bool]] = {}
        self.final: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        fs = collect_factors(pl_module.model)
        self.at_step[trainer.global_step] = weights(fs)
        self.requires_grad[trainer.global_step] = {f.key: f.module.weight.requires_grad for f in fs}

    def on_train_end(self, trainer, pl_module):
        self.final = weights(collect_factors(pl_module.model))


def loader(shape, n=64, batch_size=8, seed=0, shuffle=False):
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)  # shuffled from the global random stream


def fit(model, freeze_cfg, shape, *, max_steps, optim=None, log_flops=False, shuffle=False):
    freezer = FreezingCallback(freeze_cfg, log_flops=log_flops)
    recorder = Recorder()
    optim = optim or {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-2, "scheduler": "cosine"}
    module = Classifier(model, 10, optim=optim, max_steps=max_steps)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=100, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[freezer, recorder])
    trainer.fit(module, train_dataloaders=loader(shape, shuffle=shuffle))
    assert trainer.global_step == max_steps
    return freezer, recorder


def test_callback_freezes_at_configured_steps_and_frozen_stay_identical():
    model = make_model()
    cfg = {"schedule": "sequential", "unit": "step", "warmup": 2, "period": 2, "per_stage": 2,
           "final_fraction": 0.5, "importance": "depth", "positions": ["first", "core", "last"]}
    freezer, rec = fit(model, cfg, (3, 8, 8), max_steps=10, log_flops=True)
    hist = freezer.history
    assert [h["t"] for h in hist] == [0, 2, 4, 6]
    assert [h["global_step"] for h in hist] == [0, 2, 4, 6]
    assert [h["n_frozen"] for h in hist] == [0, 2, 4, 6]
    assert hist[-1]["frozen"] == KEYS[:6]  # depth order, nested
    for a, b in zip(hist, hist[1:]):
        assert b["frozen"][:len(a["frozen"])] == a["frozen"]
        assert b["trainable_fraction"] < a["trainable_fraction"]
        # skipped weight-gradient GEMMs: the counted training FLOPs fall with every stage
        assert b["train_flops_per_step"] < a["train_flops_per_step"]
    # requires_grad follows the schedule at every step
    for step, flags in rec.requires_grad.items():
        n = 0 if step < 2 else min(2 * ((step - 2) // 2 + 1), 6)
        assert [k for k, trainable in flags.items() if not trainable] == KEYS[:n], step
    # a factor frozen at step s is bit-identical from s to the end (SGD momentum + weight decay running)
    frozen_since = {}
    for h in hist:
        for k in h["frozen"]:
            frozen_since.setdefault(k, h["t"])
    assert set(frozen_since) == set(KEYS[:6])
    for key, s in frozen_since.items():
        assert s > 0 and not torch.equal(rec.at_step[s][key], rec.at_step[0][key]), "it trained before freezing"
        for step in range(s, 10):
            assert torch.equal(rec.at_step[step][key], rec.at_step[s][key]), (key, step)
        assert torch.equal(rec.final[key], rec.at_step[s][key]), key
    for key in KEYS[6:]:
        assert not torch.equal(rec.final[key], rec.at_step[9][key]), f"{key} stopped training"
    trainable = {f.key: f.module.weight.requires_grad for f in collect_factors(model)}
    assert trainable == {k: k not in frozen_since for k in KEYS}


def test_callback_alternating_phases_in_a_trainer():
    model = make_model()
    cfg = {"schedule": "alternating", "unit": "step", "warmup": 1, "period": 2,
           "phases": [["last"], ["first", "core"]]}
    freezer, rec = fit(model, cfg, (3, 8, 8), max_steps=6)
    assert [h["t"] for h in freezer.history] == [0, 1, 3, 5]
    lasts = [k for k in KEYS if k.endswith(".last")]
    for step, flags in rec.requires_grad.items():
        trainable = sorted(k for k, v in flags.items() if v)
        if step == 0:
            assert trainable == sorted(KEYS)
        elif step in (1, 2, 5):
            assert trainable == sorted(lasts)
        else:
            assert trainable == sorted(set(KEYS) - set(lasts))
    # during phase 0 (steps 1, 2) the first/core factors do not move; the last factors do
    for k in KEYS:
        moved = not torch.equal(rec.at_step[3][k], rec.at_step[1][k])
        assert moved == (k in lasts), k


class DeadBranch(nn.Module):
    """A live SVD network plus two branches whose gradients are exactly zero at known times.

    ``early`` feeds the output (scaled by 5: it moves a lot) only during the first 3 training steps, ``dead``
    never. Both are registered after the body, so they are the *deepest*: depth order would never pick them.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(SVDLinear(16, 32, 8), nn.ReLU(), SVDLinear(32, 32, 8), nn.ReLU(),
                                  SVDLinear(32, 10, 6))
        self.early = SVDLinear(16, 10, 4)
        self.dead = SVDLinear(16, 10, 4)
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
        gate = 5.0 if self.calls <= 3 else 0.0
        return self.body(x) + gate * self.early(x) + 0.0 * self.dead(x)


@pytest.mark.parametrize("importance", ["weight_change", "grad_norm"])
def test_measured_importance_freezes_what_moved_least(importance):
    model = DeadBranch()
    keys = [f.key for f in collect_factors(model)]
    assert keys[-4:] == ["early.first", "early.last", "dead.first", "dead.last"]
    cfg = {"schedule": "sequential", "unit": "step", "warmup": 3, "period": 3, "per_stage": 2,
           "final_fraction": 0.75, "importance": importance}
    # no momentum: a branch without gradient stops at once
    optim = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "scheduler": "none"}
    freezer, rec = fit(model, cfg, (16,), max_steps=8, optim=optim)
    hist = freezer.history
    assert [h["t"] for h in hist] == [0, 3, 6]
    assert not torch.equal(rec.at_step[3]["early.first"], rec.at_step[0]["early.first"])  # it did move early
    # stage 1 (steps 0-2): the never-used branch did not move at all, so it is frozen first
    assert sorted(hist[1]["frozen"]) == ["dead.first", "dead.last"]
    # stage 2 measures since the previous stage (steps 3-5): the early branch stood still there
    assert hist[2]["frozen"][:2] == hist[1]["frozen"]
    assert sorted(hist[2]["frozen"][2:]) == ["early.first", "early.last"]
    if importance != "weight_change":
        return
    # the same order recomputed here from the recorded weights
    change = {k: ((rec.at_step[6][k] - rec.at_step[3][k]).norm() / rec.at_step[3][k].norm()).item()
              for k in keys if k not in hist[1]["frozen"]}
    assert sorted(change, key=lambda k: (change[k], keys.index(k)))[:2] == hist[2]["frozen"][2:]

def test_callback_counts_training_flops_with_batchnorm_on_pooled_features():
    """ResNet at 32 px ends in 1x1 maps: a one-sample count failed in BatchNorm ('more than 1 value per channel')."""
    from lrd_exp.timing.flops import count_flops

    torch.manual_seed(0)
    model = nn.Sequential(SVDLinear(16, 32, 8), nn.BatchNorm1d(32), nn.ReLU(), SVDLinear(32, 10, 4))
    cfg = {"schedule": "sequential", "unit": "step", "warmup": 1, "period": 1, "per_stage": 1,
           "final_fraction": 0.5, "importance": "depth"}
    freezer, _ = fit(model, cfg, (16,), max_steps=4, log_flops=True)
    hist = freezer.history
    assert [h["n_frozen"] for h in hist] == [0, 1, 2]
    assert all("train_flops_error" not in h for h in hist), [h.get("train_flops_error") for h in hist]
    flops = [h["train_flops_per_step"] for h in hist]
    assert flops[0] > flops[1] > flops[2] > 0
    # per step = the whole batch (8), counted in the final frozen state
    x, y = next(iter(loader((16,))))
    model.train()
    assert flops[-1] == count_flops(model, x, y=y, train=True)


# ------------------------------------------------------------------ importance=cost: weight-gradient FLOPs
# output positions per sample at 8 x 8 input: layer 0 at 8 x 8; layer 3's first factor at 8 x 8, its strided core
# and last factor at 4 x 4; the 1 x 1 conv 5 at 4 x 4; the linears 9 and 11 after pooling at one position
POSITIONS_8PX = {"0": (64, 64, 64), "3": (64, 16, 16), "5": (16, 16), "9": (1, 1), "11": (1, 1)}


def test_factor_costs_are_the_weight_gradient_flops(model, factors):
    from lrd_exp.freezing.factors import factor_costs
    from lrd_exp.timing.flops import count_flops

    x, y = batch(n=4)
    costs = factor_costs(model, x[:1])
    by_layer: dict[str, list] = {}
    for f in factors:
        by_layer.setdefault(f.layer, []).append(f)
    for layer, fs in by_layer.items():
        for f, pos in zip(fs, POSITIONS_8PX[layer]):
            assert costs[f.key] == 2 * f.module.weight.numel() * pos, f.key
    # freezing one factor removes exactly its weight-gradient GEMM from a training step (4 samples); the network's
    # very first factor also takes the next factor's input gradient with it (nothing before needs it)
    model.train()
    full = count_flops(model, x, y=y, train=True)
    for f in factors:
        set_frozen(factors, [f])
        saved = costs[f.key] + (costs["0.core"] if f.key == "0.first" else 0)
        assert full - count_flops(model, x, y=y, train=True) == 4 * saved, f.key
    set_frozen(factors, [])


def test_factor_costs_leave_the_model_as_it_was(model):
    from lrd_exp.freezing.factors import factor_costs

    model.train()
    model[1].eval()  # a module the user put in eval mode stays there
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    rng = torch.get_rng_state()
    factor_costs(model, batch(n=2)[0])
    assert model.training and not model[1].training and all(m.training for i, m in enumerate(model) if i != 1)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2]) and torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert not any(f.module._forward_hooks for f in collect_factors(model))


def test_cost_order_freezes_the_most_expensive_weight_gradients_first(model, factors):
    from lrd_exp.freezing.factors import factor_costs

    costs = factor_costs(model, batch(n=1)[0])
    s = seq(factors, importance="cost", per_stage=4)
    s.costs = costs
    chosen = [f.key for f in s.frozen_at(0)]
    assert chosen == sorted(costs, key=lambda k: (-costs[k], KEYS.index(k)))[:4]
    # not the size order: the small factors of layer 0 run at 64 positions, the linears at one
    by_size = [f.key for f in seq(factors, importance="size", per_stage=4).frozen_at(0)]
    assert set(chosen) != set(by_size) and "9.last" in by_size and "9.last" not in chosen
    # without measured positions every factor counts one position: the size order
    assert [f.key for f in seq(factors, importance="cost", per_stage=4).frozen_at(0)] == by_size


def test_callback_and_benchmark_states_use_the_cost_order():
    from lrd_exp.freezing.factors import factor_costs
    from lrd_exp.freezing.schedule import schedule_states

    cfg = {"schedule": "sequential", "unit": "step", "warmup": 1, "period": 2, "per_stage": 3,
           "final_fraction": 0.5, "importance": "cost"}
    expected_model = make_model()
    costs = factor_costs(expected_model, batch(n=1)[0])
    top = sorted(costs, key=lambda k: (-costs[k], KEYS.index(k)))
    states = schedule_states(expected_model, cfg, total_units=5, example_input=batch(n=1)[0])
    assert [s.frozen for s in states] == [[], top[:3], top[:6]]
    freezer, rec = fit(make_model(), cfg, (3, 8, 8), max_steps=5)
    assert [h["frozen"] for h in freezer.history] == [[], top[:3], top[:6]]
    assert not any(rec.requires_grad[4][k] for k in top[:6])
    assert all(rec.requires_grad[4][k] for k in top[6:])


def test_cost_of_a_factor_called_twice_counts_both_calls_and_a_bad_batch_falls_back_to_size(caplog):
    from types import SimpleNamespace

    from lrd_exp.freezing.factors import factor_costs

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = SVDLinear(16, 16, 4)

        def forward(self, x):
            return self.shared(self.shared(x))

    model = Twice()
    costs = factor_costs(model, torch.randn(3, 5, 16))  # 5 tokens per sample, two calls
    assert costs == {"shared.first": 2 * 64 * 10, "shared.last": 2 * 64 * 10}
    freezer = FreezingCallback({"schedule": "sequential", "importance": "cost"})
    with caplog.at_level("WARNING", logger="lrd_exp"):
        assert freezer._measure_costs(SimpleNamespace(model=model), {"image": torch.randn(2, 16)}) == {}
    assert "largest factors first" in caplog.text


# ------------------------------------------------------------------ measuring inside a run changes nothing
def dropout_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(SVDLinear(16, 32, 8), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                         SVDLinear(32, 32, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


def test_logging_flops_leaves_the_training_bit_identical():
    """The stage's FLOP count (a training-mode forward + backward) draws no random numbers from the run: dropout
    masks and the loader's shuffling stay those of a run that does not measure."""
    cfg = {"schedule": "sequential", "unit": "step", "warmup": 2, "period": 3, "per_stage": 1,
           "final_fraction": 0.75, "importance": "depth"}
    final = {}
    for log_flops in (False, True):
        model = dropout_bn_model()
        torch.manual_seed(1)  # the run's stream: dropout and the shuffled order of every epoch
        freezer, _ = fit(model, cfg, (16,), max_steps=12, log_flops=log_flops, shuffle=True)
        assert [h["t"] for h in freezer.history] == [0, 2, 5, 8]  # the stage changes mid-epoch and across epochs
        assert all(("train_flops_per_step" in h) == log_flops for h in freezer.history)
        final[log_flops] = {k: v.clone() for k, v in model.state_dict().items()}
    assert final[True].keys() == final[False].keys()
    for k, v in final[False].items():  # weights and BatchNorm statistics
        assert torch.equal(final[True][k], v), k


def test_measuring_the_costs_leaves_the_random_state():
    """importance=cost runs the model once inside the run: a model that samples even in eval mode (noise
    injection, stochastic depth kept on) must not move the run's stream either."""
    from types import SimpleNamespace

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = SVDLinear(16, 10, 4)

        def forward(self, x):
            return self.body(x + 0.01 * torch.rand_like(x))

    freezer = FreezingCallback({"schedule": "sequential", "importance": "cost"})
    model, example = Noisy(), (torch.randn(2, 16), torch.zeros(2))
    rng = torch.get_rng_state()
    costs = freezer._measure_costs(SimpleNamespace(model=model), example)
    assert set(costs) == {"body.first", "body.last"}
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------ what the user froze stays frozen
@pytest.mark.parametrize("cfg", [
    {"schedule": "none"},
    {"schedule": "sequential", "unit": "step", "warmup": 2, "period": 2, "per_stage": 2, "final_fraction": 0.5,
     "importance": "depth"},
    {"schedule": "alternating", "unit": "step", "warmup": 1, "period": 2, "phases": [["last"], ["first", "core"]]},
], ids=["none", "sequential", "alternating"])
def test_the_schedule_never_unfreezes_what_the_user_froze(cfg):
    """A factor (weight and bias) and a non-factor layer frozen before fit stay frozen and bit-identical; every
    other factor follows the schedule exactly as in a run where the user froze nothing."""
    runs = {}
    for user_frozen in (False, True):
        model = make_model()
        if user_frozen:
            model[9].last.requires_grad_(False)
            model[1].requires_grad_(False)  # the BatchNorm's affine weights
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        _, rec = fit(model, cfg, (3, 8, 8), max_steps=8)
        runs[user_frozen] = (model, before, rec)
    model, before, rec = runs[True]
    kept = ["9.last.weight", "9.last.bias", "1.weight", "1.bias"]
    params = dict(model.named_parameters())
    for name in kept:
        assert not params[name].requires_grad and params[name].grad is None, name
        assert torch.equal(params[name].detach(), before[name]), name
    assert all(not flags["9.last"] for flags in rec.requires_grad.values())
    plain = runs[False][2]
    for step, flags in plain.requires_grad.items():  # the others: as without the user's freezing
        assert {k: v for k, v in rec.requires_grad[step].items() if k != "9.last"} == \
               {k: v for k, v in flags.items() if k != "9.last"}, step
    assert any(flags["9.last"] for flags in plain.requires_grad.values())  # without the user: it trains
    moved = [n for n, p in params.items() if n not in kept and not torch.equal(p.detach(), before[n])]
    assert moved, "nothing else trained"
