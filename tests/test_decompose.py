"""Decomposition core: exactness at full rank, optimality when truncated, rank formulas, model surgery."""

import math

import pytest
import timm
import torch
from torch import nn

from lrd_exp import decompose_model
from lrd_exp.decompose import SVDConv1x1, SVDLinear, Tucker2Conv, reconstruct_weight, register_weight_reader
from lrd_exp.decompose import ranks as R
from lrd_exp.decompose import registry as RG
from lrd_exp.decompose.runnable import Swaps, traced_reads, unpack


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- full-rank exactness
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_full_rank_linear_is_exact(dtype, tol, bias, shape):
    n_in, n_out = shape
    lin = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    x = torch.randn(16, n_in, dtype=dtype)
    new = SVDLinear.from_linear(lin, min(n_in, n_out))
    assert rel_err(new(x), lin(x)) < tol
    assert [p for p in new.factors()] == ["first", "last"]
    assert new.first.bias is None and (new.last.bias is not None) == bias


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_conv1x1_is_exact(dtype, tol, stride, padding, bias):
    conv = nn.Conv2d(12, 20, 1, stride=stride, padding=padding, bias=bias).to(dtype)
    x = torch.randn(2, 12, 9, 9, dtype=dtype)
    new = SVDConv1x1.from_conv(conv, 12)
    assert new.first.stride == (stride, stride) and new.last.stride == (1, 1)
    assert rel_err(new(x), conv(x)) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 4, 2), (3, 2, 0, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_tucker2_is_exact(dtype, tol, k, stride, padding, dilation, bias):
    conv = nn.Conv2d(6, 10, k, stride=stride, padding=padding, dilation=dilation, bias=bias).to(dtype)
    x = torch.randn(2, 6, 13, 13, dtype=dtype)
    new = Tucker2Conv.from_conv(conv, 6, 10)
    assert list(new.factors()) == ["first", "core", "last"]
    assert new.core.stride == conv.stride and new.core.dilation == conv.dilation
    assert rel_err(new(x), conv(x)) < tol


# ---------------------------------------------------------------- optimality
@pytest.mark.parametrize("rank", [1, 5, 17])
def test_truncated_svd_reaches_eckart_young(rank):
    w = torch.randn(48, 30, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, 30, dtype=torch.float64))
    lin = nn.Linear(30, 48, bias=False).double()
    lin.weight.data.copy_(w)
    new = SVDLinear.from_linear(lin, rank)
    s = torch.linalg.svdvals(w)
    optimal = s[rank:].pow(2).sum().sqrt()
    err = (reconstruct_weight(new) - w).norm()
    assert err.item() == pytest.approx(optimal.item(), rel=1e-8)
    # factors share the singular values evenly
    assert new.first.weight.norm().item() == pytest.approx(new.last.weight.norm().item(), rel=1e-8)


def test_tucker2_error_monotone_and_exact_on_low_rank():
    conv = nn.Conv2d(16, 24, 3, bias=False).double()
    errs = []
    for r in [1, 2, 4, 8, 12, 16]:
        new = Tucker2Conv.from_conv(conv, r, r * 3 // 2)
        errs.append(rel_err(reconstruct_weight(new), conv.weight.data))
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 1e-10
    # a weight that is exactly Tucker-2 of ranks (3, 5)
    core = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(24, 5, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(16, 3, dtype=torch.float64))[0]
    conv.weight.data = torch.einsum("rskl,or,is->oikl", core, u_out, u_in)
    new = Tucker2Conv.from_conv(conv, 3, 5)
    assert rel_err(reconstruct_weight(new), conv.weight.data) < 1e-10


# ---------------------------------------------------------------- rank formulas
def test_ratio_rank_formulas():
    r = R.svd_rank_for_ratio(768, 3072, 2)
    assert r == math.floor(768 * 3072 / (2 * 3840)) == 307
    assert R.svd_params(768, 3072, r) * 2 <= 768 * 3072 < R.svd_params(768, 3072, r + 1) * 2
    r = R.tucker2_rank_for_ratio(256, 256, 9, 3)
    target = 256 * 256 * 9 / 3
    assert R.tucker2_params(256, 256, 9, r, r) <= target < R.tucker2_params(256, 256, 9, r + 1, r + 1)
    # ratio just above 1 on a tiny layer: rank clamps to full rank, never 0
    assert R.svd_rank_for_ratio(3, 2, 1.0001) == 1
    assert R.tucker2_rank_for_ratio(2, 2, 9, 1.0001) <= 2
    assert R.svd_rank_for_ratio(2, 2, 1000) == 1


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    # energies: 9/14, 13/14, 14/14
    assert R.energy_rank(s, 0.5) == 1
    assert R.energy_rank(s, 9 / 14) == 1
    assert R.energy_rank(s, 0.9) == 2
    assert R.energy_rank(s, 0.99) == 3
    assert R.energy_rank(s, 1.0) == 3
    assert R.energy_rank(torch.zeros(4), 0.9) == 1


@pytest.mark.parametrize("rank,multiple,full,rounding,expected", [
    (307, 8, 768, "nearest", 304), (307, 8, 768, "up", 312), (307, 8, 768, "down", 304),
    (3, 8, 768, "down", 8),  # never 0
    (3, 64, 40, "nearest", 40),  # multiple larger than full rank -> full rank
    (100, 64, 120, "up", 64),  # rounding up past full -> largest multiple below
    (36, 64, 768, "nearest", 64), (31, 64, 768, "nearest", 64), (97, 64, 768, "nearest", 128),
])
def test_quantize_rank(rank, multiple, full, rounding, expected):
    q = R.quantize_rank(rank, multiple, full, rounding)
    assert q == expected and 1 <= q <= full


@pytest.mark.parametrize("kwargs,key", [
    ({"policy": "bogus"}, "rank.policy"), ({"policy": "ratio", "ratio": 1.0}, "rank.ratio"),
    ({"policy": "ratio", "ratio": -2}, "rank.ratio"), ({"policy": "energy", "energy": 0.0}, "rank.energy"),
    ({"policy": "energy", "energy": 1.5}, "rank.energy"), ({"policy": "quantized", "multiple": 0}, "rank.multiple"),
    ({"policy": "fixed", "rank": 0}, "rank.rank"), ({"policy": "fixed"}, "rank.rank"),
    ({"policy": "quantized", "rounding": "sideways"}, "rank.rounding"),
])
def test_bad_values_raise_valueerror_naming_key(kwargs, key):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError) as e:
        decompose_model(model, **kwargs)
    msg = str(e.value)
    assert key in msg and "allowed" in msg


# ---------------------------------------------------------------- surgery on timm models
def _count(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("resnet50", 64), ("vit_tiny_patch16_224", 224),
                                       ("vit_base_patch16_224", 224)])
def test_decompose_timm_model(name, size):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    before = _count(model)
    x = torch.randn(2, 3, size, size)
    report = decompose_model(model, policy="ratio", ratio=2.0, input_size=(3, size, size))
    assert report.params_before == before
    assert report.params_after == _count(model)
    dec = report.decomposed
    assert len(dec) > 10
    # parameters of the decomposed layers fall by the requested ratio, within rounding of the ranks
    ratio = report.decomposed_params_before / report.decomposed_params_after
    assert 1.95 < ratio < 2.2
    for layer in dec:
        assert layer.params_after * 2 <= layer.params_before
    # stem and head kept by default
    kept = {layer.name: layer.reason for layer in report.layers if layer.action == "kept"}
    assert "stem conv" in kept.values() and "classifier head" in kept.values()
    assert model(x).shape == (2, 10)
    assert report.flops_before / report.flops_after == pytest.approx(2.0, rel=0.1)
    assert "decomposed" in report.table()


def low_rank_net() -> nn.Sequential:
    """A float64 net whose 3x3 conv has channel ranks (4, 4) and whose linear has rank 4: exactly low rank."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(),
                        nn.Linear(64, 10)).double()
    with torch.no_grad():
        core = torch.randn(4, 4, 3, 3, dtype=torch.float64)
        u_out, u_in = torch.randn(32, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
        net[2].weight.copy_(torch.einsum("rskl,or,is->oikl", core, u_out, u_in))
        net[6].weight.copy_(torch.randn(64, 4, dtype=torch.float64) @ torch.randn(4, 128, dtype=torch.float64))
    return net.eval()


def test_decomposed_model_matches_at_full_energy():
    """Full energy of exactly low-rank weights: the layers ARE decomposed (at their true ranks) and the model's
    function is unchanged."""
    model = low_rank_net()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref = model(x)
    report = decompose_model(model, policy="energy", energy=1.0, input_size=(3, 8, 8))
    assert {(layer.name, layer.ranks) for layer in report.decomposed} == {("2", (4, 4)), ("6", (4,))}
    assert isinstance(model[2], Tucker2Conv) and isinstance(model[6], SVDLinear)
    torch.testing.assert_close(model(x), ref, rtol=1e-9, atol=1e-10)


class _OwnEncoderLayer(nn.TransformerEncoderLayer):
    """A subclass may have its own forward, so it is not unpacked (torch's exact classes are)."""


def test_subclassed_torch_transformer_layers_keep_the_linears_they_read_directly():
    """A subclass of torch's encoder layer reads some of its linears' weights itself (out_proj always,
    linear1/linear2 in the inference fast path): those stay dense with the reason; the model's own linears split;
    the model trains and infers."""
    torch.manual_seed(0)
    layer = _OwnEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    model = nn.Sequential(nn.Linear(32, 64), nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False),
                          nn.Flatten(), nn.Linear(640, 128), nn.Linear(128, 10))
    report = decompose_model(model, policy="ratio", ratio=2, skip_stem=False, input_size=(10, 32))
    kept = {layer.name: layer.reason for layer in report.layers if layer.action == "kept"}
    assert "MultiheadAttention (out_proj.weight)" in kept["1.layers.0.self_attn.out_proj"]
    assert "TransformerEncoderLayer (linear1.weight)" in kept["1.layers.1.linear1"]
    assert {layer.name for layer in report.decomposed} == {"0", "3"}
    x = torch.randn(3, 10, 32)
    model.train()(x).sum().backward()
    assert model.eval()(x).shape == (3, 10)


class _ReadsItsChildsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + nn.functional.linear(x, self.b.weight)


def test_a_layer_the_model_cannot_run_without_is_given_back_with_the_reason():
    model = nn.Sequential(_ReadsItsChildsWeight(), nn.Linear(32, 4))
    x = torch.randn(2, 32)
    report = decompose_model(model, policy="ratio", ratio=2, skip_head=False, example_input=x)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["0.b"].action == "kept" and by_name["0.b"].reason == "its parent reads .weight of it directly"
    assert by_name["0.a"].action == "decomposed" and isinstance(model[0].a, SVDLinear)
    assert isinstance(model[0].b, nn.Linear) and model(x).shape == (2, 4)
    assert report.params_after == _count(model)


def test_quantized_ranks_are_multiples_and_fixed_patterns():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    report = decompose_model(model, policy="quantized", ratio=2, multiple=16, input_size=(3, 224, 224))
    assert all(r % 16 == 0 for layer in report.decomposed for r in layer.ranks)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    report = decompose_model(model, policy="fixed", rank={"*.mlp.fc1": 24}, input_size=(3, 224, 224))
    assert {layer.name for layer in report.decomposed} == {f"blocks.{i}.mlp.fc1" for i in range(12)}
    assert all(layer.ranks == (24,) for layer in report.decomposed)


def test_include_overrides_skips_and_exclude_removes():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    report = decompose_model(model, policy="ratio", ratio=3, include=["conv1", "layer1.*"], exclude=["layer1.1.*"],
                             input_size=(3, 32, 32))
    names = {layer.name for layer in report.decomposed}
    assert names == {"conv1", "layer1.0.conv1", "layer1.0.conv2"}


def test_one_include_string_is_one_pattern():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    report = decompose_model(model, policy="ratio", ratio=3, include="conv1", input_size=(3, 32, 32))
    assert {layer.name for layer in report.decomposed} == {"conv1"}
    assert report.settings["include"] == ["conv1"]


def test_grouped_conv_skipped_and_works_with_rank_config_node():
    from omegaconf import OmegaConf

    from lrd_exp.config.schema import RankConfig

    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    cfg = OmegaConf.structured(RankConfig)
    cfg.policy = "quantized"
    report = decompose_model(model, **cfg, input_size=(3, 64, 64))
    reasons = {layer.reason for layer in report.layers if layer.action == "kept"}
    assert "grouped/depthwise conv (not supported)" in reasons
    assert report.params_after == _count(model)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


class _Tied(nn.Module):
    """One linear registered under two names and called twice (weight tying, a shared block)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(32, 32)
        self.again = self.shared
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.again(torch.relu(self.shared(x)))))


def test_a_layer_registered_under_two_names_is_replaced_at_both_and_stays_shared():
    torch.manual_seed(0)
    model = _Tied()
    x = torch.randn(8, 32)
    report = decompose_model(model, policy="ratio", ratio=2, example_input=x)
    assert [layer.name for layer in report.decomposed] == ["shared"]
    assert isinstance(model.shared, SVDLinear) and model.again is model.shared
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.flops_before == 2 * 2 * 32 * 32  # both calls counted: 2 FLOPs per multiply-add, one token each


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(40, 24), (3, 7, 40)),  # tokens: every position costs
    (nn.Conv2d(16, 32, 1, stride=2), (2, 16, 9, 9)),  # strided 1x1: SVD, the stride on the first factor
    (nn.Conv2d(16, 24, 3, padding=1), (2, 16, 8, 8)),
    (nn.Conv2d(12, 20, (5, 3), stride=2, padding=(2, 1), dilation=(1, 2)), (2, 12, 11, 10)),
    (nn.Conv2d(16, 24, 3, padding="same", bias=False), (2, 16, 7, 7)),
])
def test_analytic_flops_equal_the_counted_ones_for_every_layer_type(layer, shape):
    """The report's analytic forward FLOPs (LayerPlan) against FlopCounterMode on the real modules, dense and
    factorized: the two counters agree layer type by layer type, not only in a model's total."""
    from lrd_exp.timing.flops import count_flops

    torch.manual_seed(0)
    model, x = nn.Sequential(layer), torch.randn(*shape)
    dense = count_flops(model, x, train=False) // shape[0]
    report = decompose_model(model, policy="fixed", rank=5, skip_stem=False, skip_head=False, example_input=x)
    (row,) = report.decomposed
    assert row.flops_before == dense
    assert row.flops_after == count_flops(model, x, train=False) // shape[0]
    assert row.flops_after < row.flops_before


class _FlaggedReader(nn.Module):
    """Reads ``proj.weight`` itself, behind a data-dependent branch that torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.other = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            return self.other(nn.functional.linear(x, self.proj.weight))
        return x


def test_a_traceable_model_is_read_once_and_an_untraceable_one_falls_back_to_trial_forwards():
    traceable = nn.Sequential(_ReadsItsChildsWeight(), nn.Linear(32, 4))
    assert traced_reads(traceable) == {"0.b": "weight"}
    model = nn.Sequential(_FlaggedReader(), nn.Linear(32, 4))
    assert traced_reads(model) is None
    report = decompose_model(model, policy="ratio", ratio=2, skip_head=False, example_input=torch.randn(2, 32))
    kept = {layer.name: layer.reason for layer in report.layers if layer.action == "kept"}
    assert kept == {"0.proj": "its parent reads .weight of it directly"}


def test_a_declared_weight_reader_keeps_its_child_dense_with_the_reason(monkeypatch):
    monkeypatch.setattr(RG, "_READERS", dict(RG._READERS))  # the registration ends with the test
    register_weight_reader(_FlaggedReader, ("proj",))
    model = nn.Sequential(_FlaggedReader(), nn.Linear(32, 4))
    report = decompose_model(model, policy="ratio", ratio=2, skip_head=False)  # no input: the declaration decides
    kept = {layer.name: layer.reason for layer in report.layers if layer.action == "kept"}
    assert "_FlaggedReader (proj.weight)" in kept["0.proj"]
    assert {layer.name for layer in report.decomposed} == {"0.other", "1"}


def test_swaps_turn_a_readers_switch_off_while_its_children_are_swapped_and_give_everything_back():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    model = nn.Sequential(encoder, nn.Linear(16, 2))
    originals = list(model.modules())
    swaps = Swaps(model)
    assert unpack(swaps) == ["0.layers.0", "0.layers.1"] and not encoder.use_nested_tensor
    swaps.swap("1", SVDLinear.from_linear(model[1], 1))
    swaps.give_back("0.layers.0")
    assert not encoder.use_nested_tensor  # one layer is still unpacked
    swaps.give_back_all()
    assert encoder.use_nested_tensor and list(model.modules()) == originals


def test_every_configured_policy_has_its_ranks():
    """Adding a policy is one function in decompose/policies.py plus its name in the config's allowed values."""
    from lrd_exp.config.values import POLICIES
    from lrd_exp.decompose.policies import NOTHING, POLICY_RANKS, SEARCHED

    assert set(POLICIES) == set(POLICY_RANKS) | {SEARCHED, NOTHING}
