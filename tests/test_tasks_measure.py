"""The measure stage: original vs decomposed, interleaved rounds, every freeze state (lrd_exp.timing.compare, applied
to a freeze schedule by lrd_exp.tasks.measure)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrd_exp.timing.compare import CompareSettings as S
from lrd_exp.timing.flops import count_params
from lrd_exp.timing.steps import Timing

IN, HID, OUT = 12, 20, 6


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))


def test_compare_interleaves_prepared_copies_and_restores_the_model(monkeypatch):
    from lrd_exp import decompose_model
    from lrd_exp.freezing import collect_factors
    from lrd_exp.freezing.schedule import FreezeState
    from lrd_exp.tasks.measure import compare_states
    from lrd_exp.timing import steps as B

    original = mlp()
    decomposed = mlp()
    decompose_model(decomposed, policy="ratio", ratio=2.0, skip_head=False, skip_stem=False, input_size=(IN,))
    keys = [f.key for f in collect_factors(decomposed)]
    flags = [p.requires_grad for p in decomposed.parameters()]
    calls: list[tuple[int, int, int]] = []  # (id of the prepared step, warmup, steps)
    real_time = B.PreparedStep.time

    def spy(self, *, warmup, steps, min_time_s=0.0):
        calls.append((id(self), warmup, steps))
        return real_time(self, warmup=warmup, steps=steps, min_time_s=min_time_s)

    monkeypatch.setattr(B.PreparedStep, "time", spy)
    states = [FreezeState(0.25, [], "all train"), FreezeState(0.75, keys[:1], "one frozen")]
    x, y = torch.randn(4, IN), torch.randint(0, OUT, (4,))
    result = compare_states(original, decomposed, states, x, y, S(warmup=2, steps=6, rounds=3, switch_warmup=1))
    items = {c[0] for c in calls}
    assert len(items) == 1 + len(states) + 2  # original, each state, two inference copies: prepared once each
    assert len(calls) == 3 * len(items)  # every item timed once per round, in turn
    assert [c[1] for c in calls[: len(items)]] == [2] * len(items)  # warm-up in the first round
    assert {c[1] for c in calls[len(items):]} == {1}  # one untimed step after each later switch
    assert {c[2] for c in calls} == {2}  # 6 steps over 3 rounds
    assert len(result.original.train.times_s) == 6 and len(result.decomposed.stages) == 2
    assert result.decomposed.stages[1]["train_flops"] < result.decomposed.stages[0]["train_flops"]
    assert [p.requires_grad for p in decomposed.parameters()] == flags
    calls.clear()
    compare_states(original, decomposed, states, x, y, S(warmup=0, steps=2, rounds=12, inference=False))
    assert len(calls) == 2 * (1 + len(states))  # fewer steps than rounds: the rounds shrink, the total stays


def test_compare_builds_the_given_optimizer_over_trainable_params_only():
    from lrd_exp import decompose_model
    from lrd_exp.freezing import collect_factors
    from lrd_exp.freezing.schedule import FreezeState
    from lrd_exp.tasks.measure import compare_states
    from lrd_exp.training.classifier import make_optimizer

    original, decomposed = mlp(), mlp()
    decompose_model(decomposed, policy="ratio", ratio=2.0, skip_head=False, skip_stem=False, input_size=(IN,))
    frozen_factor = collect_factors(decomposed)[0]
    frozen_key = frozen_factor.key
    built: list[tuple[type, int]] = []

    def factory(params):
        opt = make_optimizer(params, {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05})
        built.append((type(opt), sum(p.numel() for p in params)))
        return opt

    states = [FreezeState(0.5, [], "all train"), FreezeState(0.5, [frozen_key], "one frozen")]
    x, y = torch.randn(4, IN), torch.randint(0, OUT, (4,))
    compare_states(original, decomposed, states, x, y,
                   S(warmup=1, steps=2, rounds=1, inference=False, optimizer_factory=factory))
    assert [t for t, _ in built] == [torch.optim.AdamW] * 3  # original + both states
    n_orig, n_all, n_frozen = (n for _, n in built)
    assert n_orig == count_params(original) and n_all == count_params(decomposed)
    assert n_all - n_frozen == frozen_factor.numel  # the frozen weight never reaches the optimizer


def test_round_spread_is_the_drift_of_block_medians_whatever_the_interleaving():
    from lrd_exp.timing.compare import round_spread

    times = [0.1, 0.1, 0.5, 0.1] + [0.2, 0.2, 0.2, 0.01] + [0.12, 0.12, 0.12, 0.12]  # one outlier per block
    one_step_rounds = [Timing(t, t, t, [t]) for t in times]
    four_step_rounds = [Timing(0.0, 0.0, 0.0, times[i:i + 4]) for i in range(0, 12, 4)]
    expected = (0.2 - 0.1) / 0.12  # block medians 0.1, 0.2, 0.12
    assert round_spread(one_step_rounds) == pytest.approx(expected)
    assert round_spread(four_step_rounds) == pytest.approx(expected)
    assert round_spread(one_step_rounds[:7]) is None  # fewer than two blocks of 4 steps
    steady = [Timing(0.1, 0.1, 0.1, [0.1 if i % 9 else 0.4]) for i in range(48)]  # isolated slow steps
    assert round_spread(steady) == 0.0


def test_compare_interleaves_one_step_per_round_by_default(monkeypatch):
    from lrd_exp import decompose_model
    from lrd_exp.freezing.schedule import FreezeState
    from lrd_exp.tasks.measure import compare_states
    from lrd_exp.timing import steps as B

    original, decomposed = mlp(), mlp()
    decompose_model(decomposed, policy="ratio", ratio=2.0, skip_head=False, skip_stem=False, input_size=(IN,))
    calls: list[tuple[int, int, int]] = []
    real_time = B.PreparedStep.time

    def spy(self, *, warmup, steps, min_time_s=0.0):
        calls.append((id(self), warmup, steps))
        return real_time(self, warmup=warmup, steps=steps, min_time_s=min_time_s)

    monkeypatch.setattr(B.PreparedStep, "time", spy)
    x, y = torch.randn(4, IN), torch.randint(0, OUT, (4,))
    orig = compare_states(original, decomposed, [FreezeState(1.0, [], "all")], x, y, S(warmup=2, steps=5)).original
    items = [c[0] for c in calls[:4]]  # original, the state, two inference copies
    assert len(set(items)) == 4 and [c[0] for c in calls] == items * 5  # in turn, five rounds
    assert {c[2] for c in calls} == {1}  # one timed step per round
    assert [c[1] for c in calls] == [2] * 4 + [0] * 16  # warm-up once, no untimed step after a switch
    assert len(orig.train.times_s) == 5 and len(orig.infer.times_s) == 5
    calls.clear()
    orig = compare_states(original, decomposed, [FreezeState(1.0, [], "all")], x, y,
                          S(warmup=0, steps=11, rounds=3, inference=False)).original
    assert [c[2] for c in calls] == [4, 4, 4, 4, 3, 3]  # the remainder goes to the first rounds
    assert len(orig.train.times_s) == 11  # `steps` stays the total
    with pytest.raises(ValueError, match="rounds"):
        compare_states(original, decomposed, [FreezeState(1.0, [], "all")], x, y, S(steps=4, rounds=0))


def test_compare_reports_when_the_machine_changes_speed_between_rounds(monkeypatch, capsys):
    from lrd_exp import decompose_model
    from lrd_exp.freezing.schedule import FreezeState
    from lrd_exp.results import unstable_note
    from lrd_exp.tasks.benchmark import print_benchmark
    from lrd_exp.tasks.measure import compare_states, comparison_fields
    from lrd_exp.timing import steps as B

    original, decomposed = mlp(), mlp()
    decompose_model(decomposed, policy="ratio", ratio=2.0, skip_head=False, skip_stem=False, input_size=(IN,))
    seen: dict[int, int] = {}

    def fake_time(self, *, warmup, steps, min_time_s=0.0):  # every item: 10 ms, then 30 ms in round 2 (a burst)
        n = seen[id(self)] = seen.get(id(self), 0) + 1
        dt = 0.03 if n == 2 else 0.01
        return Timing(dt, dt, dt, [dt] * steps, batch_size=self.batch_size)

    monkeypatch.setattr(B.PreparedStep, "time", fake_time)
    x, y = torch.randn(4, IN), torch.randint(0, OUT, (4,))
    result = compare_states(original, decomposed, [FreezeState(1.0, [], "all")], x, y, S(warmup=0, steps=12, rounds=3))
    assert result.original.round_spread == pytest.approx(2.0)  # block medians 10, 30, 10 ms
    fields = comparison_fields(original, decomposed, result, x)
    assert fields["bench_round_spread"] == pytest.approx(2.0)
    print_benchmark([{"variant": "burst", "status": "ok", **fields}], [])  # the benchmark task's report
    assert "burst: timings unstable" in capsys.readouterr().out and "200%" in unstable_note(fields)
    monkeypatch.setattr(B.PreparedStep, "time", lambda self, *, warmup, steps, min_time_s=0.0:
                        Timing(0.01, 0.01, 0.01, [0.01] * steps, batch_size=self.batch_size))
    result = compare_states(original, decomposed, [FreezeState(1.0, [], "all")], x, y, S(warmup=0, steps=12, rounds=3))
    assert result.original.round_spread == 0.0
    print_benchmark([{"variant": "calm", "status": "ok", **comparison_fields(original, decomposed, result, x)}], [])
    assert "unstable" not in capsys.readouterr().out


def test_compare_freezes_the_biases_with_freeze_bias_and_keeps_what_the_user_froze():
    """The benchmark's states freeze what training freezes: with ``freeze.freeze_bias`` the factors' biases too;
    a parameter frozen before the benchmark stays frozen in every state (and after)."""
    from lrd_exp import decompose_model
    from lrd_exp.freezing import collect_factors
    from lrd_exp.freezing.schedule import FreezeState, schedule_states
    from lrd_exp.tasks.measure import compare_states

    original, decomposed = mlp(), mlp()
    decompose_model(decomposed, policy="ratio", ratio=2.0, skip_head=False, skip_stem=False, input_size=(IN,))
    factors = {f.key: f for f in collect_factors(decomposed)}
    lasts = [f for k, f in factors.items() if k.endswith(".last")]
    assert all(f.module.bias is not None for f in lasts)
    user = factors["0.first"].module.weight
    user.requires_grad_(False)  # the user's own freezing
    x, y = torch.randn(4, IN), torch.randint(0, OUT, (4,))
    trainable = count_params(decomposed, trainable_only=True)
    for freeze_bias in (False, True):
        cfg = {"schedule": "last", "freeze_bias": freeze_bias}
        states = [FreezeState(0.5, [], "all train")] + schedule_states(decomposed, cfg, total_units=4)
        assert [sorted(s.frozen) for s in states] == [[], sorted(f.key for f in lasts)]
        built: list[int] = []

        def factory(params, built=built):
            built.append(sum(p.numel() for p in params))
            return torch.optim.SGD(params, lr=0.1)

        compare_states(original, decomposed, states, x, y,
                       S(warmup=0, steps=1, rounds=1, inference=False, optimizer_factory=factory))
        _, n_all, n_last_frozen = built
        assert n_all == trainable  # the user's frozen weight stays out of the optimizer
        frozen = sum(f.module.weight.numel() + (f.module.bias.numel() if freeze_bias else 0) for f in lasts)
        assert n_all - n_last_frozen == frozen, freeze_bias
        assert not user.requires_grad and count_params(decomposed, trainable_only=True) == trainable


@pytest.mark.parametrize("freeze_bias", [False, True])
def test_benchmark_and_measure_pair_pass_freeze_bias_to_the_states(cfg_factory, monkeypatch, freeze_bias):
    """Both entry points time the states training goes through: ``freeze.freeze_bias`` reaches every state."""
    import importlib
    from types import SimpleNamespace

    from lrd_exp import decompose_model
    from lrd_exp.devices import resolve_device

    measure = importlib.import_module("lrd_exp.tasks.measure")
    benchmark = importlib.import_module("lrd_exp.tasks.benchmark")  # the package exports a function of that name
    seen: list[list] = []
    real_compare = measure.compare_states

    def spy(original, decomposed, states, *args, **kwargs):
        seen.append(states)
        return real_compare(original, decomposed, states, *args, **kwargs)

    monkeypatch.setattr(measure, "compare_states", spy)  # the benchmark task measures through lrd_exp.tasks.measure too
    overrides = ["trainer=smoke", "dataset=digits", "model=resnet18", "freeze=last",
                 f"freeze.freeze_bias={freeze_bias}", "bench.warmup=0", "bench.steps=1", "bench.batch_size=2",
                 "device=cpu"]
    cfg = cfg_factory(["task=benchmark", *overrides])
    device = resolve_device("cpu")
    assert benchmark.benchmark(cfg, device, cfg.paths.output_dir) is not None  # the variant ran
    original, decomposed = mlp(), mlp()
    decompose_model(decomposed, policy="ratio", ratio=2.0, skip_head=False, skip_stem=False, input_size=(IN,))
    dm = SimpleNamespace(example_batch=lambda n: (torch.randn(n, IN), torch.randint(0, OUT, (n,))))
    measure.measure_pair(cfg_factory(overrides), device, original, decomposed, dm)
    assert len(seen) == 2 and all(states for states in seen)
    assert all(s.freeze_bias is freeze_bias for states in seen for s in states)
