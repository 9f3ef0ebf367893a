"""Device-measured rank optimization, FLOP accounting of decomposed models, and the benchmark task."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from lrd_exp import decompose_model
from lrd_exp.decompose.candidates import candidate_ranks
from lrd_exp.decompose.search import choose_ranks, pick, pick_within_budget
from lrd_exp.decompose.surgery import find_candidates
from lrd_exp.freezing import collect_factors, set_frozen
from lrd_exp.timing.flops import count_flops

REPO = Path(__file__).resolve().parents[1]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 10))


# ------------------------------------------------------------------ FLOPs of decomposed models
def test_flops_of_decomposed_mlp_match_formulas_with_and_without_freezing():
    model = mlp()
    report = decompose_model(model, policy="fixed", rank={"0": 16, "2": 24}, input_size=(64,), skip_head=True)
    assert [layer.ranks for layer in report.decomposed] == [(16,), (24,)]
    B = 8
    x, y = torch.randn(B, 64), torch.randint(0, 10, (B,))
    # forward: 0.first 64->16, 0.last 16->96, 2.first 96->24, 2.last 24->128, 4: 128->10
    gemms = [64 * 16, 16 * 96, 96 * 24, 24 * 128, 128 * 10]
    fwd = 2 * B * sum(gemms)
    assert count_flops(model, x, train=False) == fwd
    assert report.flops_after == sum(layer.flops_after for layer in report.layers if layer.flops_after)
    # training: every GEMM has a weight-gradient GEMM; every layer but the first has an input-gradient GEMM
    full = fwd + 2 * B * sum(gemms) + 2 * B * sum(gemms[1:])
    assert count_flops(model, x, y=y, train=True) == full
    # freezing a factor removes exactly its weight-gradient GEMM
    factors = {f.key: f for f in collect_factors(model)}
    set_frozen(list(factors.values()), [factors["2.last"]])
    assert count_flops(model, x, y=y, train=True) == full - 2 * B * 24 * 128
    # freezing the very first factor also drops 0.last's input-gradient GEMM: nothing upstream needs it
    set_frozen(list(factors.values()), [factors["2.last"], factors["0.first"]])
    assert count_flops(model, x, y=y, train=True) == full - 2 * B * (24 * 128 + 64 * 16 + 16 * 96)
    # the report's per-layer numbers are the same formulas
    assert report.decomposed[0].flops_before == 2 * 64 * 96 and report.decomposed[0].flops_after == 2 * 16 * (64 + 96)


def test_tucker_flops_match_report():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 32, 3, stride=2, padding=1),
                         nn.Conv2d(32, 32, 3, padding=1), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    report = decompose_model(conv, policy="fixed", rank=8, input_size=(3, 16, 16))
    names = [layer.name for layer in report.decomposed]
    assert names == ["1", "2"]
    x = torch.randn(1, 3, 16, 16)
    measured = count_flops(conv, x, train=False)
    dense_parts = 2 * (16 * 16 * 8 * 3 * 9) + 2 * (32 * 8 * 8 * 10)  # stem conv and head, kept
    assert measured == dense_parts + report.flops_after
    # layer "1": first 1x1 on the 16x16 input grid, the strided core and last on 8x8
    l1 = report.decomposed[0]
    assert l1.flops_after == 2 * (16 * 16 * 8 * 8 + 8 * 8 * (8 * 8 * 9 + 8 * 32))


# ------------------------------------------------------------------ the chooser
def test_pick_fastest_and_keep_when_original_fastest():
    assert pick({None: 5.0, (8,): 3.0, (16,): 4.0}, tolerance=0.0) == (8,)
    assert pick({None: 2.0, (8,): 3.0, (16,): 4.0}, tolerance=0.0) is None
    # ties within tolerance go to the largest rank (same speed, better accuracy)
    assert pick({None: 5.0, (8,): 3.0, (16,): 3.05}, tolerance=0.03) == (16,)
    assert pick({None: 5.0, (8,): 3.0, (16,): 3.2}, tolerance=0.03) == (8,)


def _plans(model, size):
    plans, _ = find_candidates(model)
    from lrd_exp.decompose.surgery import _record_shapes

    _record_shapes(model, plans, torch.randn(1, *size))
    return plans


def test_candidates_respect_compression_constraint():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))
    plan = [p for p in _plans(model, (256,)) if p.name == "2"][0]
    est = (128,)
    cands = candidate_ranks(plan, est, window=0.5, step=8, base="ratio", ratio=2.0)
    assert cands and all(c[0] % 8 == 0 for c in cands)
    assert all(plan.params_for(c) * 2 <= plan.params_dense for c in cands)
    assert min(c[0] for c in cands) >= 64 and max(c[0] for c in cands) == 128


def test_choose_ranks_with_timing_table():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))
    plans = _plans(model, (256,))
    plans = [p for p in plans if p.name in ("0", "2")]
    estimates = {"0": (80,), "2": (128,)}
    table = {("0", None): 1.0, ("2", None): 1.0}

    def timer(plan, ranks):
        if ranks is None:
            return table[(plan.name, None)] if plan.name == "2" else 0.1  # layer 0: original is fastest
        return 0.5 if ranks[0] == 112 else 0.9

    chosen, reasons, stats, _ = choose_ranks(plans, estimates, window=0.25, step=8, ratio=2.0, timer=timer,
                                          budget="layer")
    assert chosen["0"] is None and "kept" in reasons["0"]
    assert chosen["2"] == (112,) and "optimized" in reasons["2"]
    assert stats["timings_measured"] > 0


def test_model_budget_trades_params_between_layers():
    # layer a: time grows 10x faster per parameter than layer b; estimates 100 params each -> budget 200
    params = {"a": {(1,): 50, (2,): 100, (3,): 150}, "b": {(1,): 50, (2,): 100, (3,): 150}}
    times = {"a": {None: 99.0, (1,): 0.5, (2,): 1.0, (3,): 1.5}, "b": {None: 99.0, (1,): 0.95, (2,): 1.0, (3,): 1.05}}
    est = {"a": (2,), "b": (2,)}
    chosen = pick_within_budget(times, params, est, tolerance=0.0)
    # a compressed more, b less: 1.55 s instead of 2.0 s at the same 200 parameters
    assert chosen == {"a": (1,), "b": (3,)}
    # per layer each takes its own fastest (rank 1 twice): faster, but half the parameters (more compression)
    assert {n: pick(t, 0.0) for n, t in times.items()} == {"a": (1,), "b": (1,)}


def test_model_budget_pays_for_a_too_slow_estimate():
    # the fastest ranks are above budget: the layer whose parameters cost least time gives them up
    params = {"a": {(1,): 50, (2,): 100, (3,): 150}, "b": {(1,): 50, (2,): 100, (3,): 150}}
    times = {"a": {None: 99.0, (1,): 3.0, (2,): 2.0, (3,): 1.0}, "b": {None: 99.0, (1,): 1.2, (2,): 1.1, (3,): 1.0}}
    chosen = pick_within_budget(times, params, {"a": (2,), "b": (2,)}, tolerance=0.0)
    assert chosen == {"a": (3,), "b": (1,)}  # 2.2 s at 200 params; the estimates take 3.1 s


def test_model_budget_keeps_dense_layers_out_and_spends_spare_on_ties():
    params = {"a": {(1,): 50, (2,): 100}, "k": {(1,): 50, (2,): 100}, "c": {(1,): 40, (2,): 80, (3,): 120}}
    times = {"a": {None: 9.0, (1,): 1.0, (2,): 1.01},
             "k": {None: 0.1, (1,): 1.0, (2,): 2.0},  # the original is fastest: kept dense, out of the budget
             "c": {None: 9.0, (1,): 1.0, (2,): 3.0, (3,): 5.0}}
    chosen = pick_within_budget(times, params, {"a": (2,), "k": (2,), "c": (2,)}, tolerance=0.03)
    assert chosen["k"] is None
    # budget 180, floor 171: a's larger rank is nearly free, c's is not -> a=2 + c=2 (180) is the only way to
    # keep the compression; c=3 would exceed it
    assert chosen == {"a": (2,), "k": None, "c": (2,)}


def test_model_budget_never_slower_than_estimates_and_fits():
    import random

    rng = random.Random(0)
    reached = 0
    for _ in range(100):
        names = [f"l{i}" for i in range(6)]
        params = {n: {(r,): r * rng.randint(5, 20) for r in range(1, 9)} for n in names}
        times = {n: {None: 1e3, **{r: p[r] * rng.uniform(0.5, 2.0) for r in p}} for n, p in params.items()}
        est = {n: (rng.randint(2, 7),) for n in names}
        chosen = pick_within_budget(times, params, est, tolerance=0.0)
        budget = sum(params[n][est[n]] for n in names)
        used = sum(params[n][chosen[n]] for n in names)
        assert used <= budget
        assert sum(times[n][chosen[n]] for n in names) <= sum(times[n][est[n]] for n in names) + 1e-9
        reached += used >= 0.95 * budget
    assert reached >= 90  # the compression stays the estimates' (within the 5 % slack) nearly always


def test_choose_ranks_model_budget_searches_above_the_estimate():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))
    plans = [p for p in _plans(model, (256,)) if p.name in ("0", "2")]
    estimates = {"0": (80,), "2": (128,)}
    seen: dict[str, set] = {"0": set(), "2": set()}

    def timer(plan, ranks):
        if ranks is None:
            return 10.0
        seen[plan.name].add(ranks[0])
        return plan.params_for(ranks) * (3e-6 if plan.name == "0" else 1e-6)

    chosen, reasons, _, _ = choose_ranks(plans, estimates, window=0.25, step=8, ratio=2.0, timer=timer,
                                      budget="model", tolerance=0.0)
    assert max(seen["2"]) > 128  # ranks above the estimate are candidates when the budget is model-wide
    budget = sum(p.params_for(estimates[p.name]) for p in plans)
    assert sum(p.params_for(chosen[p.name]) for p in plans) <= budget
    assert chosen["0"][0] < 80 and chosen["2"][0] > 128  # the costly layer pays for the cheap one
    assert all("model-wide budget" in reasons[n] for n in ("0", "2"))


def test_optimized_policy_real_cpu_run_hits_cache_second_time(tmp_path):
    from lrd_exp.decompose.rank_timings import write_timings

    ctx = {"batch_size": 4, "cache_dir": str(tmp_path / "cache"), "warmup": 1, "steps": 2}
    model = mlp()
    rep1 = decompose_model(model, policy="optimized", ratio=2, multiple=8, input_size=(64,), rank_search=ctx)
    assert rep1.rank_search["timings_measured"] > 0
    assert rep1.rank_search["timings_cached"] == 0
    assert all(layer.reason for layer in rep1.layers)
    model(torch.randn(2, 64))
    assert not any(tmp_path.glob("*.csv"))  # the library writes nothing; the task writes the report's rows
    write_timings(str(tmp_path), rep1.rank_timings)
    timings = pd.read_csv(tmp_path / "rank_timings.csv")
    assert {"layer", "rank", "time_ms", "objective", "device_name"} <= set(timings.columns)
    assert (timings["rank"] == -1).any() and (timings["time_ms"] > 0).all()
    rep2 = decompose_model(mlp(), policy="optimized", ratio=2, multiple=8, input_size=(64,), rank_search=ctx)
    assert rep2.rank_search["timings_measured"] == 0
    assert rep2.rank_search["timings_cached"] == rep1.rank_search["timings_measured"]
    assert "timings" not in rep2.rank_search and "rank_search" not in rep2.settings
    assert [lay.ranks for lay in rep2.layers] == [lay.ranks for lay in rep1.layers]


# ------------------------------------------------------------------ the benchmark task
def test_benchmark_task_writes_valid_rows(tmp_path):
    from lrd_exp.results import RESULT_COLUMNS

    out = tmp_path / "bench"
    cmd = [sys.executable, "run.py", "task=benchmark", "logger=csv", "model=resnet18", "dataset=digits",
           "bench.batch_size=8", "bench.warmup=1", "bench.steps=2", "bench.rounds=2", "trainer.finetune_epochs=3",
           "trainer.channels_last=true",
           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}",
           "bench.variants=[{label: plain, rank: {policy: ratio}, freeze: {schedule: none}}, "
           "{label: cost, freeze: {importance: cost}}]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "result.json").read_text())
    assert set(RESULT_COLUMNS) <= set(row)
    assert row["status"] == "ok" and row["task"] == "benchmark"
    assert row["channels_last"] is True  # bench.channels_last=null follows the training loop's layout
    assert row["top1_original"] is None and row["top1_decomposed"] is None
    assert row["train_ips_original"] > 0 and row["train_ips_decomposed"] > 0
    assert row["train_speedup"] == pytest.approx(row["train_ips_decomposed"] / row["train_ips_original"])
    assert row["params_decomposed"] < row["params_original"]
    # sequential over 3 epochs: states 0, 1, 2 frozen-stages, weighted by their length
    stages = row["freeze_stages"]
    assert sum(s["weight"] for s in stages) == pytest.approx(1.0)
    assert [s["n_frozen"] for s in stages] == sorted(s["n_frozen"] for s in stages)
    assert stages[-1]["train_flops"] < stages[0]["train_flops"]
    variant = json.loads((out / "variants" / "plain" / "result.json").read_text())
    assert variant["rank_policy"] == "ratio" and variant["freeze"] == "none" and variant["status"] == "ok"
    assert "Benchmark (resnet18" in proc.stdout and "FLOP-pred." in proc.stdout
    # weight_change is only known while training: the benchmark says it times depth order; cost needs no such note
    assert (proc.stdout + proc.stderr).count("freeze in depth order") == 1
    # the cost order's first frozen stage saves at least the weight-gradient FLOPs of the depth order's
    cost = json.loads((out / "variants" / "cost" / "result.json").read_text())["freeze_stages"]
    assert [s["n_frozen"] for s in cost] == [s["n_frozen"] for s in stages]
    assert cost[0]["train_flops"] == stages[0]["train_flops"] and cost[1]["train_flops"] < stages[1]["train_flops"]


def test_timing_cache_key_changes_with_the_allocator_mode(monkeypatch):
    import lrd_exp.decompose.layer_timing as LT

    plan = _plans(mlp(), (64,))[0]
    kw = dict(device_name="cpu", precision="32-true", batch_size=4, objective="train", channels_last=False)
    monkeypatch.setattr(LT, "malloc_mode", lambda: "tuned")
    tuned = LT.TimingCache.key(plan, **kw)
    assert LT.TimingCache.key(plan, **kw) == tuned  # stable
    monkeypatch.setattr(LT, "malloc_mode", lambda: "system")
    assert LT.TimingCache.key(plan, **kw) != tuned


# ------------------------------------------------------------------ never slower than the original
def test_pick_never_takes_a_tie_slower_than_the_original():
    # (16,) ties with the fastest (8,) within 3 %, but it is slower than the dense layer: not allowed
    assert pick({None: 1.0, (8,): 0.98, (16,): 1.005}, tolerance=0.03) == (8,)
    assert pick({None: 1.0, (8,): 1.0, (16,): 1.02}, tolerance=0.03) is None


def test_model_budget_never_picks_a_rank_slower_than_the_original():
    # the estimate a (2.0 ms) is slower than the original (1.5 ms); b (1.0 ms) alone over-compresses, so the
    # budget pushes back toward a
    params = {"l": {(1,): 50, (2,): 100}}
    times = {"l": {None: 1.5e-3, (2,): 2.0e-3, (1,): 1.0e-3}}
    assert pick_within_budget(times, params, {"l": (2,)}, tolerance=0.0) == {"l": (1,)}
    # no rank faster than the original: dense, out of the budget, which the other layer then has alone
    params = {"k": {(1,): 50, (2,): 100}, "c": {(1,): 50, (2,): 100, (3,): 150}}
    times = {"k": {None: 1.5, (1,): 1.6, (2,): 2.0}, "c": {None: 9.0, (1,): 1.0, (2,): 2.0, (3,): 3.0}}
    assert pick_within_budget(times, params, {"k": (2,), "c": (2,)}, tolerance=0.0) == {"k": None, "c": (2,)}



def test_model_budget_slow_estimate_whose_only_faster_rank_is_larger():
    # a's estimate and smaller rank are slower than its original; only the larger rank 3 is faster. b pays for it
    params = {"a": {(1,): 50, (2,): 100, (3,): 150}, "b": {(1,): 50, (2,): 100, (3,): 150}}
    times = {"a": {None: 1.5, (1,): 2.0, (2,): 2.0, (3,): 1.0}, "b": {None: 9.0, (1,): 1.0, (2,): 1.0, (3,): 1.0}}
    assert pick_within_budget(times, params, {"a": (2,), "b": (2,)}, tolerance=0.0) == {"a": (3,), "b": (1,)}
    # b cannot pay: over the budget rather than slower than the original
    params["b"], times["b"] = {(2,): 100}, {None: 9.0, (2,): 1.0}
    assert pick_within_budget(times, params, {"a": (2,), "b": (2,)}, tolerance=0.0) == {"a": (3,), "b": (2,)}

def test_model_budget_random_tables_never_slower_than_the_original():
    import random

    rng = random.Random(1)
    for _ in range(200):
        names = [f"l{i}" for i in range(5)]
        params = {n: {(r,): r * rng.randint(5, 20) for r in range(1, 9)} for n in names}
        times = {n: {None: rng.uniform(2.0, 12.0), **{r: p[r] * rng.uniform(0.02, 0.12) for r in p}}
                 for n, p in params.items()}
        est = {n: (rng.randint(2, 7),) for n in names}
        for tol in (0.0, 0.05):
            chosen = pick_within_budget(times, params, est, tolerance=tol)
            assert all(r is None or times[n][r] < times[n][None] for n, r in chosen.items())
            assert all(r is None or times[n][r] < times[n][None]
                       for n, r in ((n, pick(times[n], tol)) for n in names))


def test_choose_ranks_model_budget_keeps_every_layer_at_most_as_slow_as_the_original():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))
    plans = [p for p in _plans(model, (256,)) if p.name in ("0", "2")]
    estimates = {"0": (80,), "2": (128,)}
    ms = {("0", None): 10.0, ("2", None): 1.5, ("2", 128): 2.0, ("2", 96): 1.0}

    def timer(plan, ranks):  # layer 0: flat; layer 2: the estimate is slower than dense, only 96 is faster
        key = (plan.name, None if ranks is None else ranks[0])
        return ms.get(key, 1.0 if plan.name == "0" else 3.0) * 1e-3

    for budget in ("model", "layer"):
        chosen, reasons, _, _ = choose_ranks(plans, estimates, window=0.25, step=8, ratio=2.0, timer=timer,
                                          budget=budget, tolerance=0.0)
        for p in plans:
            r = chosen[p.name]
            assert r is None or timer(p, r) < timer(p, None), (budget, p.name, r)
        assert chosen["2"] == (96,)


# ------------------------------------------------------------------ the estimate is always a candidate
def test_estimate_that_would_not_shrink_the_layer_keeps_it_dense_with_a_reason():
    # 128 x 128 at ratio 2 and multiple 64: the quantized estimate 64 has as many parameters as the layer;
    # its neighbours 48 and 56 do shrink it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 128))
    timed = []

    def timer(plan, ranks):
        timed.append((plan.name, ranks))
        return 1.0 if ranks is None else 0.5

    report = decompose_model(model, policy="optimized", ratio=2, multiple=64, input_size=(128,),
                             rank_search={"timer": timer})
    layers = {layer.name: layer for layer in report.layers}
    for name in ("0", "1"):
        assert layers[name].action == "kept" and "would not shrink" in layers[name].reason
    assert not timed  # nothing to time for a layer the estimate leaves dense
    plans = _plans(nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 128)), (128,))
    chosen, reasons, _, _ = choose_ranks(plans, {p.name: (64,) for p in plans}, timer=timer, budget="layer")
    assert all(chosen[p.name] is None and "would not shrink" in reasons[p.name] for p in plans)


def test_estimate_is_a_candidate_even_below_the_energy_rank():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.Linear(512, 10))
    plan = [p for p in _plans(model, (256,)) if p.name == "2"][0]
    cands = candidate_ranks(plan, (64,), window=0.25, step=8, base="energy", ratio=2.0, energy_ranks=(72,))
    assert (64,) in cands and all(c[0] >= 72 for c in cands if c != (64,))


# ------------------------------------------------------------------ timing in the run's dtype and compile mode
def _timed_forwards(monkeypatch, precision, *, compile=False, objective="both"):
    """Run choose_ranks with the real timer on one small layer; what every module forward saw."""
    seen = []

    def hook(module, args, _out):
        x = args[0]
        seen.append({"params": {p.dtype for p in module.parameters(recurse=False)}, "input": x.dtype,
                     "autocast": torch.is_autocast_enabled("cpu"), "autocast_dtype": torch.get_autocast_dtype("cpu")})

    plan = [p for p in _plans(mlp(), (64,)) if p.name == "2"][0]
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        choose_ranks([plan], {"2": (48,)}, window=0.0, step=8, precision=precision, objective=objective,
                     budget="layer", warmup=0, steps=1, batch_size=2, compile=compile)
    finally:
        handle.remove()
    assert seen
    return seen


@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("bf16-true", torch.bfloat16),
                                             ("64-true", torch.float64), ("16-true", torch.float16)])
def test_layers_are_timed_in_the_precision_dtype(monkeypatch, precision, dtype):
    for call in _timed_forwards(monkeypatch, precision):
        assert call["input"] == dtype
        assert call["params"] <= {dtype}
        assert not call["autocast"]


def test_mixed_precision_times_under_autocast(monkeypatch):
    for call in _timed_forwards(monkeypatch, "bf16-mixed"):
        assert call["autocast"] and call["autocast_dtype"] == torch.bfloat16
        assert call["params"] <= {torch.float32}  # mixed precision keeps float32 weights


def test_compile_wraps_the_timed_module_and_changes_the_cache_key(monkeypatch):
    from lrd_exp.decompose.layer_timing import TimingCache

    compiled = []

    def spy(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", spy)
    _timed_forwards(monkeypatch, "32-true", compile=True)
    assert len(compiled) == 2  # the original and the one candidate
    compiled.clear()
    _timed_forwards(monkeypatch, "32-true", compile=False)
    assert not compiled
    plan = _plans(mlp(), (64,))[0]
    kw = dict(device_name="cpu", batch_size=4, objective="train", channels_last=False)
    keys = {TimingCache.key(plan, precision=p, compile=c, **kw)
            for p in ("32-true", "bf16-true", "bf16-mixed", "64-true") for c in (False, True)}
    assert len(keys) == 8
    assert TimingCache.key(plan, precision="32-true", compile=True, warmup=1, steps=2, **kw) != \
        TimingCache.key(plan, precision="32-true", compile=True, warmup=1, steps=5, **kw)


def _doubled(t):
    return t * 2


def test_compiled_timing_gives_each_candidate_a_static_graph_and_keeps_other_graphs(monkeypatch):
    """Really compiled (dynamo with a counting eager backend: seconds on a CPU). Candidates of one class share its
    ``forward``: each must still get its own static graph (no recompile limit, no automatic dynamic shapes across
    layers of different widths), leave no entry behind, and a graph compiled elsewhere in the process survives the
    search (no global ``torch._dynamo.reset()``)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from lrd_exp.decompose.layers import FactorizedLayer

    real_compile, graphs = torch.compile, []

    def static_graph(gm, example_inputs):
        shapes = [getattr(n.meta.get("example_value"), "shape", ()) for n in gm.graph.nodes if n.op == "placeholder"]
        graphs.append(not any(isinstance(d, torch.SymInt) for shape in shapes for d in shape))
        return gm.forward

    other = real_compile(_doubled, backend="eager")
    other(torch.ones(3))
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=static_graph, **kw))
    plans = [p for p in _plans(mlp(), (64,)) if p.name in ("0", "2")]
    found = choose_ranks(plans, {"0": (16,), "2": (24,)}, window=0.9, step=8, warmup=1, steps=1, batch_size=2,
                         objective="both", compile=True)
    factored = [r for r in found.timings if r["rank"] > 0]
    assert {r["layer"] for r in factored} == {"0", "2"} and 2 * len(factored) > 8  # past dynamo's recompile limit
    assert len(graphs) == 2 * len(found.timings) and all(graphs)  # a training and an inference graph each, static
    assert not _debug_get_cache_entry_list(FactorizedLayer.forward.__code__)
    assert not _debug_get_cache_entry_list(nn.Linear.forward.__code__)
    assert len(_debug_get_cache_entry_list(_doubled.__code__)) == 1


def test_a_failing_timing_names_the_layer_and_precision(monkeypatch):
    import lrd_exp.timing.layer as TL

    def boom(*args, **kwargs):
        raise RuntimeError("\"addmm\" not implemented for 'Half'")

    monkeypatch.setattr(TL, "time_fn", boom)
    plan = [p for p in _plans(mlp(), (64,)) if p.name == "2"][0]
    with pytest.raises(RuntimeError, match=r"layer 2.*16-true.*not implemented"):
        choose_ranks([plan], {"2": (48,)}, window=0.0, precision="16-true", budget="layer", warmup=0, steps=1)


def test_an_unknown_rank_search_key_is_one_line_before_any_work():
    with pytest.raises(ValueError) as exc:
        decompose_model(mlp(), policy="optimized", input_size=(64,), rank_search={"output_dir": "/tmp/x"})
    text = str(exc.value)
    assert "\n" not in text and "rank_search" in text and "'output_dir'" in text and "damage_cache_dir" in text
