"""Calibrated decomposition: factors fitted to the layers' outputs, BatchNorm re-estimation, calibration inputs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lrd_exp import decompose_model
from lrd_exp.decompose import functional as Fn
from lrd_exp.decompose.calibration import (
    CalibrationError,
    calibration_batches,
    layer_positions,
    recalibrate_bn,
)
from lrd_exp.decompose.capture import watch
from lrd_exp.decompose.layers import SVDConv1x1, SVDLinear, Tucker2Conv, reconstruct_weight


def _inputs(n_in: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.05, 3.0, n_in, dtype=torch.float64)  # anisotropic: whitening matters
    return torch.randn(n, n_in, generator=g, dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------- the closed forms
@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_svd_is_the_optimum_of_the_output_error(rank):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 20, generator=g, dtype=torch.float64)
    x = _inputs(20, 300).T  # in x positions
    first, last = Fn.whitened_svd_factors(w, rank, x @ x.T)
    err = Fn.output_error(w, last @ first, x @ x.T)
    u, s, vt = torch.linalg.svd(w @ x)  # the best rank-r approximation of the outputs themselves
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    optimum = (torch.linalg.norm(w @ x - best) / torch.linalg.norm(w @ x)).item()
    assert err == pytest.approx(optimum, rel=1e-9)
    direct = (torch.linalg.norm(w @ x - last @ first @ x) / torch.linalg.norm(w @ x)).item()
    assert direct == pytest.approx(optimum, rel=1e-9)
    weight_only = Fn.svd_factors(w, rank)
    assert err < Fn.output_error(w, weight_only[1] @ weight_only[0], x @ x.T)


def test_whitened_svd_of_a_tall_layer_matches_the_wide_path():
    """out > in takes the in x in route (S = H^1/2): the same subspace and error as the out x out one."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 10, generator=g, dtype=torch.float64)
    x = _inputs(10, 200).T
    h = x @ x.T
    first, last = Fn.whitened_svd_factors(w, 4, h)
    u, evals = Fn.psd_eigh(w @ h @ w.T)
    ref_first, ref_last = Fn.whitened_svd_factors(w, 4, h, spectrum=(u, evals.sqrt()))
    assert torch.allclose(last @ first, ref_last @ ref_first, atol=1e-9)


def test_fitted_tucker2_core_and_output_factor_are_least_squares_optimal():
    """Given the input factor, the core and output factor minimise ||W P - W~ P||: with rank_out = out that is
    plain least squares on the patches, computed here by lstsq."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(8, 5, 7, 7, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, 5,
                                                                                     dtype=torch.float64)[:, None, None]
    conv = nn.Conv2d(5, 6, 3, padding=1, bias=False).double()
    patches = layer_positions(conv, x).reshape(-1, 45)  # positions x in*k*k
    moment = patches.T @ patches
    first, core, last = Fn.tucker2_fitted_factors(w, 3, 6, moment)
    fitted = Fn.output_error(w, Fn.tucker2_reconstruct(first, core, last), moment)
    fp = torch.einsum("ri,nik->nrk", first, patches.reshape(-1, 5, 9)).reshape(-1, 27)  # the projected patches
    target = patches @ w.reshape(6, 45).T
    g_ls = torch.linalg.lstsq(fp, target).solution.T  # out x r1*k*k
    best = (torch.linalg.norm(target - fp @ g_ls.T) / torch.linalg.norm(target)).item()
    assert fitted == pytest.approx(best, rel=1e-8)
    y = F.conv2d(x, w, padding=1)
    y_hat = F.conv2d(x, Fn.tucker2_reconstruct(first, core, last), padding=1)
    assert (torch.linalg.norm(y - y_hat) / torch.linalg.norm(y)).item() == pytest.approx(fitted, rel=1e-8)


def test_fitted_tucker2_at_full_ranks_is_exact():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    p = layer_positions(conv, x).reshape(-1, 27)
    first, core, last = Fn.tucker2_fitted_factors(w, 3, 4, p.T @ p)
    assert torch.allclose(Fn.tucker2_reconstruct(first, core, last), w, atol=1e-9)


def test_layer_positions_are_unfold_patches():
    x = torch.randn(2, 3, 9, 11)
    for conv in (nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
                 nn.Conv2d(3, 5, 1, stride=2)):
        ref = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        assert torch.equal(layer_positions(conv, x), ref.transpose(1, 2))
    sampled = layer_positions(nn.Conv2d(3, 5, 3, padding=1), x, per_sample=7, generator=torch.Generator())
    assert sampled.shape == (2, 7, 27)
    full = F.unfold(x, 3, padding=1).transpose(1, 2)
    for n in range(2):  # every sampled patch is one of the sample's own patches
        assert all((full[n] == row).all(1).any() for row in sampled[n])


# ------------------------------------------------------------------------------------------------ the model API
def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10, in_chans=1).eval()


def _layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    grabbed = {}

    def grab(name: str, module: nn.Module, inputs: torch.Tensor, _out: object) -> None:
        positions = layer_positions(module, inputs)
        grabbed[name] = positions.reshape(-1, positions.shape[-1])

    with torch.no_grad(), watch({n: model.get_submodule(n) for n in names}, grab, before=True):
        model(x)
    return grabbed


def _output_error(model: nn.Module, name: str, patches: torch.Tensor, target: torch.Tensor) -> float:
    w_hat = reconstruct_weight(model.get_submodule(name)).flatten(1).double()
    return (torch.linalg.norm(target - patches @ w_hat.T) / torch.linalg.norm(target)).item()


def test_activation_fit_beats_the_weight_fit_on_every_svd_layer_of_resnet18(capsys):
    model = _resnet18()
    x = torch.randn(24, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    weights, acts = copy.deepcopy(model), copy.deepcopy(model)
    decompose_model(weights, policy="quantized", ratio=4, fit="weights", recalibrate_bn=False, example_input=x[:1])
    report = decompose_model(acts, policy="quantized", ratio=4, calibration=x, calibrate="independent",
                             recalibrate_bn=False)
    assert report.fit == "activations" and report.calibration_images == 24
    names = [layer.name for layer in report.decomposed]
    inputs = _layer_inputs(model, names, x)  # the original inputs: independent calibration's own
    lines = []
    for name in names:
        dense = model.get_submodule(name).weight.detach().flatten(1).double()
        p = inputs[name].double()
        target = p @ dense.T

        e_act, e_w = (_output_error(m, name, p, target) for m in (acts, weights))
        kind = next(layer.kind for layer in report.decomposed if layer.name == name)
        if kind == "svd":
            # the layer's own moments were subsampled to at most 8192 positions: these are all of them
            assert e_act <= e_w + 1e-6, name
        lines.append(f"{name} ({kind}): output error, activation fit {e_act:.4f}, weight fit {e_w:.4f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    reported = {layer.name: layer for layer in report.decomposed}
    assert all(layer.error_of == "output" for layer in reported.values())
    assert "output_error" in report.table()


def test_fit_weights_is_the_paper_factors_bit_for_bit():
    """fit=weights, with or without calibration inputs (no BN re-estimation), builds exactly the truncated SVD /
    HOSVD factors of the weights."""
    model = _resnet18()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    decompose_model(a, policy="quantized", ratio=2, fit="weights", input_size=(1, 32, 32))
    decompose_model(b, policy="quantized", ratio=2, fit="weights", recalibrate_bn=False,
                    calibration=torch.randn(4, 1, 32, 32))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    conv = model.layer1[0].conv1
    first, core, last = Fn.tucker2_factors(conv.weight.detach(), *a.layer1[0].conv1.ranks)
    assert torch.equal(a.layer1[0].conv1.core.weight, core)
    assert torch.equal(a.layer1[0].conv1.first.weight, first[:, :, None, None])
    fc = nn.Linear(64, 32)
    f, last = Fn.svd_factors(fc.weight.detach(), 8)
    new = SVDLinear.from_linear(fc, 8)
    assert torch.equal(new.first.weight, f) and torch.equal(new.last.weight, last)


def test_fit_auto_follows_the_calibration_inputs():
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 16, 4))
    assert decompose_model(copy.deepcopy(m), policy="fixed", rank=4, input_size=(3, 8, 8)).fit == "weights"
    report = decompose_model(copy.deepcopy(m), policy="fixed", rank=4, calibration=torch.randn(4, 3, 8, 8))
    assert report.fit == "activations" and report.decomposed and report.calibration_s > 0


def test_energy_ranks_read_the_whitened_spectrum():
    """policy=energy with an activation fit keeps the energy of W X's singular values, not of W's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))
    x = torch.randn(64, 16) * torch.linspace(0.01, 2, 16)
    w = model[0].weight.detach().double().clone()
    weights_rank = decompose_model(copy.deepcopy(model), policy="energy", energy=0.9).layers[0].ranks[0]
    report = decompose_model(model, policy="energy", energy=0.9, calibration=x)
    s = torch.linalg.svdvals(w @ x.double().T)
    sq = s ** 2
    expected = int((torch.cumsum(sq, 0) / sq.sum() < 0.9 - 1e-12).sum().item()) + 1
    assert report.layers[0].name == "0" and report.layers[0].ranks[0] == expected
    assert expected != weights_rank  # the inputs' scale matters: not the weight's own spectrum


def test_sequential_calibration_reports_the_end_to_end_error():
    """With sequential calibration a layer is fitted to the original's outputs from the decomposed model's inputs;
    its reported error is ||W X - W' X^|| / ||W X||, checked here by running both models."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 3)).double()
    x = torch.randn(200, 12, dtype=torch.float64)
    original = copy.deepcopy(model)
    report = decompose_model(model, policy="fixed", rank=5, calibration=x, calibrate="sequential", skip_head=True)
    with torch.no_grad():
        x_orig = torch.relu(original[0](x))
        x_hat = torch.relu(model[0](x))
        target = original[2](x_orig) - original[2].bias
        got = model[2](x_hat) - model[2].last.bias
    err = (torch.linalg.norm(target - got) / torch.linalg.norm(target)).item()
    layer = next(r for r in report.layers if r.name == "2")
    assert layer.rel_error == pytest.approx(err, rel=1e-6)
    independent = copy.deepcopy(original)
    decompose_model(independent, policy="fixed", rank=5, calibration=x, calibrate="independent", skip_head=True)
    with torch.no_grad():
        e_ind = torch.linalg.norm(original(x) - independent(x)).item()
        e_seq = torch.linalg.norm(original(x) - model(x)).item()
    assert e_seq <= e_ind  # the second layer corrects the first one's error


# ------------------------------------------------------------------------------------------- BatchNorm, batches
def test_recalibrate_bn_matches_hand_computed_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    model.train()
    model[1].running_mean.fill_(5.0)
    batches = [torch.randn(6, 3, 8, 8) for _ in range(3)]
    assert recalibrate_bn(model, batches) == 1
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    varis = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model[1].running_mean, means, atol=1e-5)
    assert torch.allclose(model[1].running_var, varis, atol=1e-5)
    assert model[1].momentum == 0.1 and model.training and model[3].training  # modes and momentum restored


def test_a_dict_batch_model_decomposes_with_calibration():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.fc1 = nn.Linear(32, 64)
            self.fc2 = nn.Linear(64, 32)
            self.head = nn.Linear(32, 50)

        def forward(self, input_ids, attention_mask):
            h = self.embed(input_ids) * attention_mask[..., None]
            return self.head(h + self.fc2(torch.relu(self.fc1(h))))

    torch.manual_seed(0)
    model = TinyLM().eval()
    batches = [{"input_ids": torch.randint(0, 50, (4, 10)), "attention_mask": torch.ones(4, 10)} for _ in range(3)]
    before = copy.deepcopy(model)
    report = decompose_model(model, policy="fixed", rank=16, calibration=batches)
    assert report.fit == "activations" and report.calibration_images == 12
    assert {layer.name for layer in report.decomposed} == {"fc1", "fc2"}
    assert isinstance(model.fc1, SVDLinear)
    with torch.no_grad():
        out, ref = model(**batches[0]), before(**batches[0])
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_zeroed_channels_and_zero_inputs_give_finite_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 1), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    with torch.no_grad():
        model[0].weight[:8] = 0  # dead channels: half the next layers' inputs are always zero
        model[0].bias[:8] = 0
    x = torch.randn(8, 3, 8, 8)
    report = decompose_model(model, policy="fixed", rank=4, calibration=x, skip_stem=True)
    assert report.decomposed
    assert all(torch.isfinite(p).all() for p in model.parameters())
    zeros = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    decompose_model(zeros, policy="fixed", rank=2, calibration=torch.zeros(4, 8))
    assert all(torch.isfinite(p).all() for p in zeros.parameters())


def test_calibration_batches_limit_the_images():
    x = torch.randn(70, 3)
    got = calibration_batches(x, 50)
    assert [b.shape[0] for b in got] == [32, 18]
    assert sum(b.shape[0] for b in calibration_batches([(x[:30], x[:30]), (x[30:], x[30:])], 40)[1]) == 20


# ------------------------------------------------------------------------------------------------ bad input
def test_activations_without_calibration_names_it():
    with pytest.raises(ValueError, match="calibration"):
        decompose_model(_resnet18(), policy="quantized", fit="activations")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_calibration_images_must_be_a_positive_count(bad):
    with pytest.raises(ValueError, match=r"rank\.calibration_images"):
        decompose_model(_resnet18(), policy="quantized", calibration_images=bad)


def test_batches_that_do_not_fit_give_the_models_error_and_the_shapes():
    with pytest.raises(CalibrationError, match=r"calibration batch of shapes 4x3x32x32: RuntimeError") as info:
        decompose_model(_resnet18(), policy="quantized", calibration=torch.randn(4, 3, 32, 32))
    assert "\n" not in str(info.value)


def test_non_finite_activations_name_the_first_layer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias[0] = float("inf")
    with pytest.raises(CalibrationError, match=r"layer '2'"):
        decompose_model(model, policy="fixed", rank=2, calibration=torch.randn(4, 4))


def test_svd_conv_and_tucker_accept_a_moment():
    conv1, conv3 = nn.Conv2d(6, 8, 1), nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(4, 6, 5, 5)
    p1, p3 = layer_positions(conv1, x).reshape(-1, 6), layer_positions(conv3, x).reshape(-1, 54)
    a = SVDConv1x1.from_conv(conv1, 3, moment=(p1.T @ p1).double())
    b = Tucker2Conv.from_conv(conv3, 3, 4, moment=(p3.T @ p3).double())
    assert a(x).shape == conv1(x).shape and b(x).shape == conv3(x).shape


# ------------------------------------------------------------------------------- give back only what breaks
class _ReadsWeight(nn.Module):
    """A block whose forward reads its first child's weight itself (as torchvision's Swin attention does)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(96, 32)

    def forward(self, x):
        return self.proj(F.linear(x, self.qkv.weight, self.qkv.bias))


def test_only_the_layer_read_directly_is_given_back():
    torch.manual_seed(0)
    model = nn.Sequential(_ReadsWeight(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), _ReadsWeight(),
                          nn.Linear(32, 5))
    report = decompose_model(model, policy="fixed", rank=4, input_size=(32,))
    kept = {r.name: r.reason for r in report.layers if r.action == "kept"}
    assert set(kept) == {"0.qkv", "4.qkv", "5"}
    assert kept["0.qkv"] == "its parent reads .weight of it directly"
    assert {r.name for r in report.decomposed} == {"0.proj", "1", "3", "4.proj"}
    assert isinstance(model[0].proj, SVDLinear) and isinstance(model[0].qkv, nn.Linear)
    assert model(torch.randn(3, 32)).shape == (3, 5)
    assert "__getattr__" not in vars(type(model[1]).__mro__[1])  # the lookup recorder is gone afterwards


@pytest.mark.slow  # about 10 s alone: torchvision's swin_t at 224 px, one forward per give-back round
def test_swin_keeps_only_its_attention_projections_shrinks_and_trains():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(weights=None).eval()
    report = decompose_model(model, policy="quantized", ratio=2, input_size=(3, 224, 224))
    kept = {r.name: r.reason for r in report.layers if r.action == "kept"}
    decomposed = {r.name for r in report.decomposed}
    assert all(n.endswith(("attn.qkv", "attn.proj")) for n in kept if n not in ("features.0.0", "head"))
    assert all(kept[n] == "its parent reads .weight of it directly" for n in kept if "attn" in n)
    assert {n for n in decomposed if "mlp" in n} and {n for n in decomposed if n.endswith("reduction")}
    assert report.params_after < 0.7 * report.params_before
    model.train()(torch.randn(2, 3, 224, 224)).logsumexp(1).mean().backward()
    mlp = next(m for n, m in model.named_modules() if n.endswith("mlp.0"))
    assert mlp.first.weight.grad is not None and mlp.first.weight.grad.abs().sum() > 0


def test_same_and_reflect_padding_patches_match_the_conv():
    x = torch.randn(2, 3, 9, 10)
    for conv in (nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(3, 4, (2, 4), padding="same"),
                 nn.Conv2d(3, 4, 3, padding="valid"), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")):
        p = layer_positions(conv, x)  # N x positions x in*k*k: the conv is exactly W @ patch + b at each one
        y = (p @ conv.weight.detach().flatten(1).T + conv.bias.detach()).transpose(1, 2)
        assert torch.allclose(y.reshape(conv(x).shape), conv(x), atol=1e-5), conv


def test_recalibrate_bn_keeps_unreached_and_failed_statistics():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.aux = nn.BatchNorm2d(4)  # never reached by forward

        def forward(self, x):
            return self.bn(self.conv(x))

    model = TwoHeads()
    model.aux.running_mean.fill_(3.0)
    recalibrate_bn(model, torch.randn(8, 3, 6, 6))
    assert torch.all(model.aux.running_mean == 3.0) and int(model.bn.num_batches_tracked) > 0
    model.bn.running_mean.fill_(7.0)
    with pytest.raises(CalibrationError):
        recalibrate_bn(model, torch.randn(8, 5, 6, 6))  # wrong channels: the pass fails
    assert torch.all(model.bn.running_mean == 7.0) and model.bn.momentum == 0.1


class _CallsWithKeywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(input=torch.relu(self.a(input=x)))


def test_layers_called_with_keyword_inputs_are_fitted_to_their_outputs_and_counted():
    torch.manual_seed(0)
    model = _CallsWithKeywords()
    report = decompose_model(model, policy="ratio", ratio=2, skip_head=False, calibration=torch.randn(64, 16))
    assert [layer.name for layer in report.decomposed] == ["a", "b"]
    assert all(layer.error_of == "output" and layer.flops_before for layer in report.decomposed)
