"""Deploying the faster form of each decomposed layer: merged and factored compute the same function, and the
measured times decide."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lrd_exp import decompose_model, merge_for_inference
from lrd_exp.decompose.layers import FactorizedLayer, SVDConv1x1, SVDLinear, Tucker2Conv
from lrd_exp.deploy import merge as M
from lrd_exp.timing import layer as TL


def net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=2,
                          dilation=2), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 1, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    decompose_model(model, policy="ratio", ratio=2, skip_stem=False, skip_head=False, input_size=(3, 16, 16))
    return model.eval()


def test_each_merged_layer_computes_what_its_factors_compute():
    model = net()
    kinds = {type(m) for m in model.modules() if isinstance(m, FactorizedLayer)}
    assert kinds == {Tucker2Conv, SVDConv1x1, SVDLinear}
    x = torch.randn(4, 3, 16, 16)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLayer)]:
        inputs = M._inputs(model, x)
        dense = M.merged_layer(layer)
        assert isinstance(dense, nn.Linear if isinstance(layer, SVDLinear) else nn.Conv2d)
        torch.testing.assert_close(dense(inputs[name]), layer(inputs[name]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged_faster", [{"0", "5", "10"}, set()])
def test_the_faster_form_of_each_layer_is_kept(monkeypatch, merged_faster):
    """Times come from a fake clock per (layer, form): the choice follows them, and the function stays the same."""
    model = net()
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    current: list[str] = []
    real_merged_layer = M.merged_layer

    def tag_merged(layer):
        current.append(next(n for n, m in deployed.named_modules() if m is layer))
        return real_merged_layer(layer)

    calls = []

    def fake_time_fn(fn, *, warmup, steps, sync):
        form = "factored" if len(calls) % 2 == 0 else "merged"
        calls.append(form)
        fast = (form == "merged") == (current[-1] in merged_faster)
        return type("T", (), {"median_s": 0.001 if fast else 0.002})()

    deployed = copy.deepcopy(model)
    monkeypatch.setattr(M, "merged_layer", tag_merged)
    monkeypatch.setattr(TL, "time_fn", fake_time_fn)  # the per-layer timing merge shares with the rank search
    report = merge_for_inference(deployed, x)
    assert {r["name"] for r in report.layers if r["merged"]} == merged_faster
    assert report.layers_merged == len(merged_faster)
    for name in ("0", "2", "5", "8", "10"):
        assert isinstance(deployed.get_submodule(name), FactorizedLayer) != (name in merged_faster)
    torch.testing.assert_close(deployed(x), ref, rtol=1e-4, atol=1e-5)


def test_merging_really_times_on_the_device():
    model = net()
    report = merge_for_inference(copy.deepcopy(model), torch.randn(2, 3, 16, 16), steps=3, warmup=1)
    assert len(report.layers) == 5
    assert all(r["factored_ms"] > 0 and r["merged_ms"] > 0 for r in report.layers)
    assert "merged" in report.summary()
