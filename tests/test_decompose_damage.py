"""rank.damage_by: the fisher estimate of a layer's damage against the measured one, its cache and its keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrd_exp import decompose_model
from lrd_exp.decompose.allocation import allocation_candidates
from lrd_exp.decompose.damage import fisher_damage, layer_damage
from lrd_exp.decompose.surgery import build_factorized, find_candidates


def _plans(model: nn.Module, multiple: int = 4):
    plans, _ = find_candidates(model, include=["*"])
    return plans, {p.name: allocation_candidates(p, multiple) for p in plans}


def test_fisher_equals_the_measured_output_error_of_a_linear_model():
    """A model linear in each layer's output: the first-order estimate of the relative output error is exact in
    expectation, so with many random projections it matches the measured error of every cut."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 12), nn.Linear(12, 1)).eval()
    plans, cands = _plans(model)
    batches = [torch.randn(64, 16)]
    measured, _ = layer_damage(model, plans, cands, batches, build_factorized, method="measured")
    estimate = fisher_damage(model, plans, cands, batches, build_factorized, samples=2000)
    pairs = [(measured[n][r], estimate[n][r]) for n in estimate for r in estimate[n]]
    assert len(pairs) >= 3
    for m, f in pairs:
        assert f == pytest.approx(m, rel=0.08), pairs


def test_fisher_matches_the_measured_kl_of_small_cuts():
    """Class scores: for cuts that change the outputs a little, 1/2 dy' F dy is the KL to second order; with many
    drawn labels the estimate is within a few percent of the measured KL, and keeps its order over the ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        model[4].weight.mul_(0.3)  # soft predictions: the quadratic expansion holds for every cut here
    plans, _ = find_candidates(model, include=["*"])
    cands = {p.name: [(24,), (28,)] for p in plans if p.name == "2"}
    plans = [p for p in plans if p.name == "2"]
    batches = [torch.randn(48, 16)]
    measured, _ = layer_damage(model, plans, cands, batches, build_factorized, method="measured")
    estimate = fisher_damage(model, plans, cands, batches, build_factorized, samples=1500)
    for r in cands["2"]:
        assert 0 < measured["2"][r] < 0.05
        assert estimate["2"][r] == pytest.approx(measured["2"][r], rel=0.08)
    assert estimate["2"][(24,)] > estimate["2"][(28,)]


def test_fisher_cache_round_trip_and_own_key(tmp_path):
    """A second call reads every estimate from disk; the measured damages live under other keys."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    plans, cands = _plans(model)
    batches = [torch.randn(32, 16)]
    first, s1 = layer_damage(model, plans, cands, batches, build_factorized, method="fisher", cache_dir=str(tmp_path))
    second, s2 = layer_damage(model, plans, cands, batches, build_factorized, method="fisher", cache_dir=str(tmp_path))
    n = sum(map(len, cands.values()))
    assert s1["damage_measured"] == n and s2["damage_measured"] == 0 and s2["damage_cached"] == n
    assert first == second and s1["damage_by"] == "fisher"
    _, s3 = layer_damage(model, plans, cands, batches, build_factorized, method="measured", cache_dir=str(tmp_path))
    assert s3["damage_measured"] == n


def test_fisher_reaches_layers_before_frozen_ones_and_handles_dict_inputs():
    """Frozen weights and integer inputs: nothing before the first layer needs a gradient, and it still gets one."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    batches = [{"input_ids": torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    plans, cands = _plans(model, multiple=8)
    plans = [p for p in plans if cands[p.name]]
    estimate = fisher_damage(model, plans, cands, batches, build_factorized)
    assert {p.name for p in plans} == set(estimate) and len(estimate) >= 3
    assert all(v > 0 for t in estimate.values() for v in t.values())
    assert all(p.grad is None for p in model.parameters())


def test_global_allocation_by_fisher_meets_the_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(),
                          nn.Linear(48, 10)).eval()
    report = decompose_model(model, ratio=3, calibration=torch.randn(96, 32), allocation="global",
                             damage_by="fisher", check_images=0)
    a = report.allocation
    assert a["damage_by"] == "fisher" and a["damage_measured"] > 0
    assert a["spent"] <= a["budget"] and a["predicted_damage"] <= a["uniform_predicted_damage"] + 1e-15


def test_bad_damage_by_stops_before_any_work():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the model ran")

    with pytest.raises(ValueError) as exc:
        decompose_model(nn.Sequential(nn.Linear(8, 8), Boom()), calibration=torch.randn(4, 8), damage_by="fishr")
    text = str(exc.value)
    assert "\n" not in text and all(n in text for n in ("rank.damage_by", "fishr", "measured, fisher")), text


class _Keyword(nn.Module):
    """A layer called by keyword, then an in-place activation, then a 1-D output (one value per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, x):
        h = torch.relu_(self.a(input=x))
        return self.c(torch.tanh(self.b(h))).squeeze(-1)


def test_fisher_sees_the_layer_output_before_in_place_ops_and_judges_1d_outputs_by_their_error():
    """``ReLU(inplace=True)`` after a layer must not change what was recorded (a frozen model would otherwise fail
    outright); a 1-D output is one value per sample: the relative error, as the measurement judges it."""
    torch.manual_seed(0)
    model = _Keyword().eval().requires_grad_(False)
    plans, _ = find_candidates(model, include=["*"])
    plans = [p for p in plans if p.name == "a"]
    cands = {"a": [(13,), (15,)]}
    batches = [torch.randn(64, 16)]
    measured, _ = layer_damage(model, plans, cands, batches, build_factorized, method="measured")
    estimate = fisher_damage(model, plans, cands, batches, build_factorized, samples=1500)
    for r in cands["a"]:
        assert 0 < measured["a"][r] < 0.3  # a relative output error, not a KL
        assert estimate["a"][r] == pytest.approx(measured["a"][r], rel=0.15)


def test_fisher_measures_a_layer_no_gradient_reaches():
    """A forward that detaches after a layer would give it damage 0 (cut first): that layer is measured instead."""
    class Detached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 10)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).detach())

    torch.manual_seed(0)
    model = Detached().eval()
    plans, cands = _plans(model)
    batches = [torch.randn(32, 16)]
    estimate = fisher_damage(model, plans, cands, batches, build_factorized)
    measured, _ = layer_damage(model, plans, cands, batches, build_factorized, method="measured")
    assert estimate["a"] == {r: d for r, d in measured["a"].items() if r is not None}
    assert all(v > 0 for v in estimate["a"].values())
    assert estimate["b"] != measured["b"] and all(v > 0 for v in estimate["b"].values())
