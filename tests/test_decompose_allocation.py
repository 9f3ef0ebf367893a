"""rank.allocation: measured per-layer damage (cached), one budget for the whole model, the fastest within a damage."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from lrd_exp import decompose_model
from lrd_exp.config.values import check_rank_keys
from lrd_exp.decompose.allocation import allocation_candidates, solve
from lrd_exp.decompose.damage import layer_damage
from lrd_exp.decompose.surgery import build_factorized, find_candidates


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                         nn.Linear(48, 10))


def test_model_digest_covers_scalar_buffers_and_changes_with_the_weights():
    """BatchNorm's 0-d ``num_batches_tracked`` hashes; one changed weight gives another key."""
    from lrd_exp.decompose.damage import model_digest

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    before = model_digest(model)
    assert before == model_digest(model)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-3
    assert model_digest(model) != before


def _data(n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def _brute(objective, cost, budget):
    names = list(objective)
    best, best_sel = math.inf, None
    for combo in itertools.product(*(list(objective[n]) for n in names)):
        sel = dict(zip(names, combo))
        if sum(cost[n][r] for n, r in sel.items()) <= budget and (
                total := sum(objective[n][r] for n, r in sel.items())) < best:
            best, best_sel = total, sel
    return best, best_sel


def test_damage_cache_round_trip(tmp_path):
    """The second measurement reads every damage from disk: nothing measured, the same numbers."""
    model = _mlp()
    plans, _ = find_candidates(model)
    cands = {p.name: allocation_candidates(p, 8) for p in plans}
    batches = [_data(64)]
    first, s1 = layer_damage(model, plans, cands, batches, build_factorized, cache_dir=str(tmp_path))
    second, s2 = layer_damage(model, plans, cands, batches, build_factorized, cache_dir=str(tmp_path))
    n = sum(len(c) for c in cands.values())
    assert n >= 6 and s1["damage_measured"] == n and s1["damage_cached"] == 0
    assert s2["damage_measured"] == 0 and s2["damage_cached"] == n
    assert first == second
    for table in first.values():  # dense: no damage; fewer ranks, more damage (relative output error here)
        ranks = sorted((r for r in table if r is not None), key=lambda r: r[0])
        assert table[None] == 0.0 and table[ranks[0]] > table[ranks[-1]] > 0
    # other images: a new key, measured again
    _, s3 = layer_damage(model, plans, cands, [_data(64, seed=9)], build_factorized, cache_dir=str(tmp_path))
    assert s3["damage_measured"] == n


def test_solver_matches_brute_force():
    """A hand-made problem where the cheapest damage per parameter is a trap (layer b's small step), and random
    small ones: the solver's total damage equals the brute-force optimum within the budget."""
    objective = {"a": {None: 0.0, (8,): 0.05, (4,): 0.30}, "b": {None: 0.0, (8,): 0.01, (4,): 0.90},
                 "c": {None: 0.0, (16,): 0.02, (8,): 0.04, (4,): 0.20}}
    cost = {"a": {None: 100, (8,): 50, (4,): 25}, "b": {None: 100, (8,): 60, (4,): 30},
            "c": {None: 200, (16,): 80, (8,): 40, (4,): 20}}
    ref = {"a": (8,), "b": (8,), "c": (8,)}
    sel = solve(objective, cost, ref)
    best, _ = _brute(objective, cost, 150)
    assert sum(objective[n][r] for n, r in sel.items()) == pytest.approx(best)
    assert sum(cost[n][r] for n, r in sel.items()) <= 150
    rng = random.Random(0)
    worse = 0
    for _ in range(40):
        obj, cst, ref = {}, {}, {}
        for layer in "abcd":
            steps = sorted(rng.sample(range(5, 100), 4), reverse=True)
            damages = sorted(rng.random() for _ in range(4))
            obj[layer] = {None: 0.0, **{(s,): d for s, d in zip(steps, damages)}}
            cst[layer] = {None: 110.0, **{(s,): float(s) for s in steps}}
            ref[layer] = (steps[rng.randrange(4)],)
        sel = solve(obj, cst, ref)
        budget = sum(cst[n][r] for n, r in ref.items())
        got = sum(obj[n][r] for n, r in sel.items())
        assert sum(cst[n][r] for n, r in sel.items()) <= budget
        assert got <= sum(obj[n][r] for n, r in ref.items()) + 1e-12  # never worse than uniform
        worse += got > _brute(obj, cst, budget)[0] + 1e-12
    assert worse <= 2, f"{worse} of 40 random problems missed the optimum"


def test_global_meets_the_parameter_budget_within_one_step():
    """global by params: the decomposed layers' total stays within the uniform ranks' total, and no layer's next
    larger candidate would still fit (within one rank step of the budget)."""
    x = _data()
    uniform = decompose_model(_mlp(), ratio=4, calibration=x, check_images=0)
    model = _mlp()
    report = decompose_model(model, ratio=4, calibration=x, allocation="global", check_images=0)
    a = report.allocation
    names = {p.name for p in find_candidates(_mlp())[0]}
    spent_u = sum(lay.params_after for lay in uniform.layers if lay.name in names)
    assert a["budget"] == pytest.approx(spent_u) and a["spent"] <= a["budget"]
    assert sum(lay.params_after for lay in report.layers if lay.damage is not None) == pytest.approx(a["spent"])
    assert a["predicted_damage"] <= a["uniform_predicted_damage"] + 1e-12
    spare = a["budget"] - a["spent"]
    plans, _ = find_candidates(_mlp())
    for p in plans:
        layer = next(lay for lay in report.layers if lay.name == p.name)
        now = layer.params_after
        larger = [p.params_for(r) for r in allocation_candidates(p, 8) if p.params_for(r) > now] + (
            [p.params_dense] if layer.action == "decomposed" else [])
        assert all(c - now > spare for c in larger), (p.name, now, larger, spare)


def test_dense_where_factors_would_not_shrink_it():
    """A 64 x 4 layer at multiple 8: no rank shrinks it, so it has no candidate and stays dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 3))
    plans, _ = find_candidates(model)
    thin = next(p for p in plans if p.name == "2")
    assert allocation_candidates(thin, 8) == []
    report = decompose_model(model, ratio=2, calibration=_data(), allocation="global", check_images=0)
    layer = next(lay for lay in report.layers if lay.name == "2")
    assert layer.action == "kept" and layer.params_after == 256
    solo = {"x": {None: 0.0, (8,): 0.2}, "y": {None: 0.0, (8,): 0.1}}
    cost = {"x": {None: 100, (8,): 120}, "y": {None: 100, (8,): 50}}  # x's factors would be larger than x
    assert solve(solo, cost, {"x": (8,), "y": (8,)}) == {"x": None, "y": (8,)}


@pytest.mark.parametrize("keys,needles", [
    ({"allocation": "globl"}, ["rank.allocation", "globl", "uniform, global, fastest"]),
    ({"budget_by": "memory"}, ["rank.budget_by", "memory", "params, flops, time"]),
    ({"max_damage": -1.0}, ["rank.max_damage", "-1", ">= 0"]),
    ({"damage_images": 0}, ["rank.damage_images", "0", ">= 1"]),
    ({"allocation": "global", "policy": "fixed", "rank": 4}, ["rank.allocation", "fixed", "quantized"]),
])
def test_bad_allocation_keys_stop_before_any_work(keys, needles):
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the model ran")

    model = nn.Sequential(nn.Linear(8, 8), Boom())
    with pytest.raises(ValueError) as exc:
        decompose_model(model, calibration=torch.randn(4, 8), **keys)
    text = str(exc.value)
    assert "\n" not in text and all(n in text for n in needles), text
    with pytest.raises(ValueError, match="rank."):
        check_rank_keys(policy=keys.get("policy", "quantized"), ratio=2, energy=0.9, multiple=8, rounding="nearest",
                        base="ratio", rank=keys.get("rank"), window=0.25, step=8, objective="train",
                        tolerance=0.03, budget="model", fit="auto", calibrate="independent",
                        calibration_images=16, **{k: v for k, v in keys.items() if k not in ("policy", "rank")})


def test_fastest_within_damage_and_time_budget(tmp_path):
    """fastest: predicted damage within the bound (default: the uniform ranks'), never slower than uniform by the
    (here synthetic: seconds = params) timings; global by time spends within the uniform ranks' seconds."""
    def timer(plan, ranks):
        return float(plan.params_dense if ranks is None else plan.params_for(ranks)) * 1e-6

    x = _data()
    for extra in ({"allocation": "fastest"}, {"allocation": "fastest", "max_damage": 0.05},
                  {"allocation": "global", "budget_by": "time"}, {"allocation": "global", "budget_by": "flops"}):
        report = decompose_model(_mlp(), ratio=4, calibration=x, rank_search={"timer": timer}, check_images=0,
                                 **extra)
        a = report.allocation
        assert a["spent"] <= a["budget"] * (1 + 1e-12), extra
        if extra["allocation"] == "fastest":
            assert a["predicted_s"] <= a["uniform_predicted_s"] + 1e-15
            assert a["predicted_damage"] <= (extra.get("max_damage") or a["uniform_predicted_damage"]) + 1e-12
        else:
            assert a["predicted_damage"] <= a["uniform_predicted_damage"] + 1e-12


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_global_on_torch_attention(tmp_path):
    """The projections inside torch's attention are allocated like any linear; the check measures the total."""
    torch.manual_seed(0)
    model = _Encoder().eval()
    x = torch.randn(64, 8, 8)
    report = decompose_model(model, ratio=2, calibration=x, evaluation=torch.randn(32, 8, 8), allocation="global",
                             rank_search={"damage_cache_dir": str(tmp_path)})
    a = report.allocation
    damaged = [lay for lay in report.layers if lay.damage is not None]
    assert any("self_attn" in lay.name for lay in damaged) and a["spent"] <= a["budget"]
    assert report.check is not None and report.check.kl >= 0 and model(x).shape == (64, 10)
    assert a["predicted_damage"] == pytest.approx(sum(lay.damage for lay in damaged))
    assert "allocation=global by params" in report.summary() and "against the original: agreement" in report.summary()
    assert "damage" in report.table()
    assert any(tmp_path.iterdir())


def test_global_on_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    report = decompose_model(model, ratio=2, calibration=batches, allocation="global", damage_images=8,
                             check_images=8)
    a = report.allocation
    assert a["spent"] <= a["budget"] and a["damage_measured"] > 0
    assert any("c_attn" in lay.name for lay in report.layers if lay.damage is not None)
    assert model(**batches[0]).logits.shape == (4, 16, 100)
