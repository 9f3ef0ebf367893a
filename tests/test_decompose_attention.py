"""torch's attention and transformer layers: unpacked into equivalents whose projections factorize like any linear.

Every equivalence is checked with the projections factorized at full rank (so the module is the factorized one and
its outputs must still equal torch's), in float64, under one seed so that dropout draws the same masks.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torchvision
from torch import nn

from lrd_exp import FreezeSchedule, decompose_model, load_decomposed, merge_for_inference, save_decomposed
from lrd_exp.decompose.attention import (
    FactorizableDecoderLayer,
    FactorizableEncoderLayer,
    FactorizableMultiheadAttention,
)
from lrd_exp.decompose.calibration import CalibrationError
from lrd_exp.decompose.layers import FactorizedLayer, SVDLinear
from lrd_exp.decompose.registry import unpacked
from lrd_exp.decompose.runnable import Swaps, unpack
from lrd_exp.deploy.model_file import structure
from lrd_exp.freezing.factors import collect_factors

DT = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched")  # torch's own, on bool and float masks


def full_rank(model: nn.Module) -> nn.Module:
    """Unpack, then replace every linear with its full-rank SVD factorization (the same function)."""
    model = unpacked(model)
    unpack(Swaps(model))
    for name, m in list(model.named_modules()):
        if type(m) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
            model.set_submodule(name, SVDLinear.from_linear(m, min(m.in_features, m.out_features)))
    assert any(isinstance(m, FactorizedLayer) for m in model.modules())
    return model


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.stride() == b.stride()  # the layout a following dropout draws its mask in
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def run_both(original: nn.Module, factorized: nn.Module, *args, **kwargs):
    torch.manual_seed(7)
    a = original(*args, **kwargs)
    torch.manual_seed(7)
    return a, factorized(*args, **kwargs)


MASKS = ["none", "key_padding", "attn_2d", "attn_3d_and_padding", "attn_bool", "causal"]


@pytest.mark.parametrize("batch_first,need_weights,mode", itertools.product([True, False], [True, False],
                                                                            ["train", "eval"]))
@pytest.mark.parametrize("extras", [{}, {"add_bias_kv": True, "add_zero_attn": True}, {"kdim": 12, "vdim": 10}])
def test_multihead_attention_with_full_rank_factors_equals_torch(batch_first, need_weights, mode, extras):
    torch.manual_seed(0)
    n, length, source, heads = 3, 5, 7, 4
    mha = nn.MultiheadAttention(16, heads, dropout=0.2, batch_first=batch_first, dtype=DT, **extras)
    fact = full_rank(copy.deepcopy(mha))
    assert isinstance(fact, FactorizableMultiheadAttention) and isinstance(fact.q_proj, SVDLinear)
    mha.train(mode == "train"), fact.train(mode == "train")
    q = torch.randn(n, length, 16, dtype=DT)
    k, v = torch.randn(n, source, extras.get("kdim", 16), dtype=DT), torch.randn(n, source, extras.get("vdim", 16),
                                                                                   dtype=DT)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -2:] = True
    masks = {"none": {}, "key_padding": {"key_padding_mask": padding},
             "attn_2d": {"attn_mask": torch.randn(length, source, dtype=DT)},
             "attn_3d_and_padding": {"attn_mask": torch.randn(n * heads, length, source, dtype=DT),
                                     "key_padding_mask": padding},
             "attn_bool": {"attn_mask": torch.rand(length, source) > 0.7}}
    for kwargs in masks.values():
        for average in (True, False):
            (a, wa), (b, wb) = run_both(mha, fact, q, k, v, need_weights=need_weights,
                                        average_attn_weights=average, **kwargs)
            same(a, b)
            assert (wa is None) == (wb is None)
            if wa is not None:
                torch.testing.assert_close(wa, wb, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("need_weights", [True, False])
def test_causal_hint_and_unbatched_inputs_match_torch(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True, dtype=DT)
    fact = full_rank(copy.deepcopy(mha))
    x = torch.randn(2, 5, 16, dtype=DT)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    (a, _), (b, _) = run_both(mha, fact, x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    same(a, b)
    single = torch.randn(5, 16, dtype=DT)
    (a, wa), (b, wb) = run_both(mha.eval(), fact.eval(), single, single, single, need_weights=need_weights)
    same(a, b)
    assert (wa is None and wb is None) or torch.allclose(wa, wb)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        fact(x, x, x, is_causal=True)


def layer_inputs(batch_first: bool):
    n, length, source = 3, 5, 6
    x, memory = torch.randn(n, length, 16, dtype=DT), torch.randn(n, source, 16, dtype=DT)
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[1, -1] = True
    memory_padding = torch.zeros(n, source, dtype=torch.bool)
    memory_padding[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=DT)
    return x, memory, padding, memory_padding, causal


@pytest.mark.parametrize("batch_first,norm_first,mode", itertools.product([True, False], [True, False],
                                                                          ["train", "eval"]))
@pytest.mark.parametrize("activation", ["relu", "gelu", nn.SiLU()])
def test_encoder_and_decoder_with_full_rank_factors_equal_torch(batch_first, norm_first, mode, activation):
    torch.manual_seed(0)
    settings = {"dropout": 0.2, "activation": activation, "batch_first": batch_first, "norm_first": norm_first,
                "dtype": DT}
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, **settings), 2, enable_nested_tensor=False)
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, **settings), 2)
    enc, dec = full_rank(copy.deepcopy(encoder)), full_rank(copy.deepcopy(decoder))
    assert isinstance(enc.layers[0], FactorizableEncoderLayer) and isinstance(dec.layers[1], FactorizableDecoderLayer)
    assert isinstance(enc.layers[0].linear1, SVDLinear) and isinstance(dec.layers[0].multihead_attn.v_proj, SVDLinear)
    for m in (encoder, decoder, enc, dec):
        m.train(mode == "train")
    x, memory, padding, memory_padding, causal = layer_inputs(batch_first)
    for kwargs in ({}, {"mask": causal, "is_causal": True}, {"src_key_padding_mask": padding},
                   {"mask": causal, "src_key_padding_mask": padding}):
        same(*run_both(encoder, enc, x, **kwargs))
    for kwargs in ({}, {"tgt_mask": causal, "tgt_is_causal": True},
                   {"tgt_key_padding_mask": padding, "memory_key_padding_mask": memory_padding},
                   {"tgt_mask": causal, "memory_mask": torch.zeros(5, 6, dtype=DT)}):
        same(*run_both(decoder, dec, x, memory, **kwargs))


class TinyTransformer(nn.Module):
    """A plain-PyTorch classifier: embedding, a TransformerEncoder, a head."""

    def __init__(self, dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def projection_names(prefix: str) -> set[str]:
    attn = {f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    return attn | {f"{prefix}.linear1", f"{prefix}.linear2"}


def test_a_plain_transformer_encoder_shrinks_by_the_ratio_and_trains():
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(4, 6, 8)
    report = decompose_model(model, policy="ratio", ratio=2, example_input=x)
    expected = {"embed"} | projection_names("encoder.layers.0") | projection_names("encoder.layers.1")
    assert {layer.name for layer in report.decomposed} == expected
    for layer in report.decomposed:  # each layer at about half its parameters
        assert layer.params_after <= layer.params_before / 2 + max(layer.weight_shape)
    saved = sum(layer.params_before - layer.params_after for layer in report.decomposed)
    assert report.params_before - report.params_after == saved
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.decomposed_params_before / report.decomposed_params_after == pytest.approx(2, rel=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    y = torch.randint(0, 10, (4,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_the_factors_inside_attention_freeze_like_any_other():
    torch.manual_seed(0)
    model = TinyTransformer(layers=1)
    decompose_model(model, policy="ratio", ratio=2, example_input=torch.randn(2, 6, 8))
    keys = {f.key for f in collect_factors(model)}
    assert {"encoder.layers.0.self_attn.q_proj.first", "encoder.layers.0.self_attn.out_proj.last"} <= keys
    schedule = FreezeSchedule({"schedule": "first", "warmup": 0}, collect_factors(model))
    frozen = {f.key for f in schedule.frozen_at(0)}
    assert "encoder.layers.0.self_attn.k_proj.first" in frozen
    assert "encoder.layers.0.self_attn.k_proj.last" not in frozen


def test_calibrated_fit_of_attention_projections_is_at_least_as_good_as_the_weight_fit():
    torch.manual_seed(0)
    base = TinyTransformer(layers=1)
    data = torch.randn(64, 6, 8) @ torch.diag(torch.linspace(0.05, 3, 8))
    fitted, plain = copy.deepcopy(base), copy.deepcopy(base)
    decompose_model(fitted, policy="ratio", ratio=4, calibration=data, recalibrate_bn=False)
    decompose_model(plain, policy="ratio", ratio=4, fit="weights", example_input=data[:1])
    with torch.no_grad():
        ref = base.eval()(data)
        err = {name: (m.eval()(data) - ref).norm().item() for name, m in (("fitted", fitted), ("plain", plain))}
    assert err["fitted"] < err["plain"]


def test_attention_left_dense_goes_back_to_torch_and_a_failure_restores_it():
    torch.manual_seed(0)
    model = TinyTransformer(layers=1)
    report = decompose_model(model, policy="ratio", ratio=2, include=["embed"], skip_stem=False,
                             example_input=torch.randn(2, 6, 8))
    assert [layer.name for layer in report.decomposed] == ["embed"]
    assert type(model.encoder.layers[0]) is nn.TransformerEncoderLayer  # fused inference path kept
    untouched = TinyTransformer(layers=1)
    with pytest.raises(CalibrationError, match="failed on the example input"):
        decompose_model(untouched, policy="ratio", ratio=2, example_input=torch.randn(2, 6, 7))
    assert type(untouched.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert type(untouched.encoder.layers[0].self_attn) is nn.MultiheadAttention


def test_a_pattern_may_name_an_unpacked_projection():
    torch.manual_seed(0)
    model = TinyTransformer(layers=1)
    report = decompose_model(model, policy="ratio", ratio=2, include=["*.q_proj"],
                             example_input=torch.randn(2, 6, 8))
    assert [layer.name for layer in report.decomposed] == ["encoder.layers.0.self_attn.q_proj"]
    with pytest.raises(ValueError, match="q_prj.*did you mean"):
        decompose_model(model, policy="ratio", include=["encoder.layers.0.self_attn.q_prj"])


def test_the_model_file_merge_and_onnx_handle_unpacked_attention(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(3, 6, 8)
    decompose_model(model, policy="ratio", ratio=2, example_input=x)
    model.eval()
    ref = model(x)
    path = save_decomposed(model, tmp_path / "model.pt")
    loaded = load_decomposed(path, model=TinyTransformer())
    assert structure(loaded) == structure(model)
    assert torch.equal(loaded(x), ref)

    report = merge_for_inference(loaded, x, warmup=0, steps=2)
    assert len(report.layers) == 13 and all(layer["factored_ms"] is not None for layer in report.layers)
    torch.testing.assert_close(loaded(x), ref, rtol=1e-4, atol=1e-5)

    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from lrd_exp.deploy.export import export_onnx, run_onnx

    onnx_path = export_onnx(model, x, tmp_path / "model.onnx")
    out = run_onnx(onnx_path, torch.randn(5, 6, 8))
    assert out.shape == (5, 10)
    torch.testing.assert_close(torch.from_numpy(run_onnx(onnx_path, x)), ref, rtol=1e-4, atol=1e-4)


def test_a_torchvision_vit_shrinks_in_attention_and_mlp_and_trains():
    """torchvision's VisionTransformer (vit_b_16's class, here small) runs nn.MultiheadAttention."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=64, mlp_dim=128, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    report = decompose_model(model, policy="ratio", ratio=2, example_input=x)
    names = {layer.name for layer in report.decomposed}
    assert "encoder.layers.encoder_layer_0.self_attention.q_proj" in names
    assert "encoder.layers.encoder_layer_1.self_attention.out_proj" in names
    assert "encoder.layers.encoder_layer_1.mlp.0" in names
    assert report.decomposed_params_before / report.decomposed_params_after == pytest.approx(2, rel=0.1)
    loss = model.train()(x).logsumexp(1).mean()
    loss.backward()
    assert model.encoder.layers.encoder_layer_0.self_attention.q_proj.first.weight.grad is not None


@pytest.mark.slow
def test_torchvision_vit_b_16_shrinks_by_the_ratio_and_trains():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    before = sum(p.numel() for p in model.parameters())
    report = decompose_model(model, policy="ratio", ratio=2, example_input=torch.randn(1, 3, 32, 32))
    assert len(report.decomposed) == 12 * 6  # q, k, v, out and the two MLP linears of every block
    assert report.decomposed_params_before / report.decomposed_params_after == pytest.approx(2, rel=0.05)
    assert report.params_after == before - report.decomposed_params_before + report.decomposed_params_after
    x = torch.randn(2, 3, 32, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    nn.functional.cross_entropy(model.train()(x), torch.tensor([1, 2])).backward()
    opt.step()
    assert model.eval()(x).shape == (2, 10)


def test_shared_attention_and_tied_encoder_layers_stay_shared():
    """An attention used by two blocks, and one encoder layer listed twice (ALBERT), are unpacked once."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.ModuleDict({"a": layer, "b": layer}), nn.Linear(16, 2))
    model.forward = lambda x: model[1](model[0]["b"](model[0]["a"](x)))  # noqa: E731 - two calls of one layer
    before = sum(p.numel() for p in model.parameters())
    report = decompose_model(model, policy="fixed", rank=4, example_input=torch.randn(2, 5, 16))
    assert model[0]["a"] is model[0]["b"] and isinstance(model[0]["a"].self_attn.q_proj, SVDLinear)
    assert report.params_after == sum(p.numel() for p in model.parameters()) < before
    assert report.params_before - report.params_after == sum(
        layer.params_before - layer.params_after for layer in report.decomposed)


def test_a_nested_tensor_encoder_runs_masked_inference_once_unpacked():
    """torch's encoder reads its layers' packed weights on its nested-tensor path (eval, a padding mask)."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    model = nn.Sequential(encoder)
    x, padding = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    decompose_model(model, policy="fixed", rank=4, skip_stem=False, skip_head=False, example_input=x)
    assert isinstance(encoder.layers[0].self_attn.q_proj, SVDLinear)
    assert encoder.eval()(x, src_key_padding_mask=padding).shape == (2, 5, 16)
    dense = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2))
    decompose_model(dense, policy="fixed", rank=16, skip_stem=False, skip_head=False, example_input=x)
    assert dense[0].use_nested_tensor  # left dense: torch's own layers and fast path again


def test_a_key_padding_mask_of_the_wrong_shape_is_refused_as_torch_does():
    mha = nn.MultiheadAttention(8, 2)
    q = torch.randn(3, 2, 8)
    wrong = torch.zeros(3, 2, dtype=torch.bool)  # (L, N) by mistake
    with pytest.raises((AssertionError, RuntimeError)):
        mha(q, q, q, key_padding_mask=wrong)
    with pytest.raises(RuntimeError, match="key_padding_mask"):
        unpacked(mha)(q, q, q, key_padding_mask=wrong)


def test_a_new_factorizable_attention_is_initialised_as_torch_initialises():
    """Xavier-uniform over the packed 3E x E matrix (bound sqrt(6 / 4E)), zero biases, finite bias_k / bias_v."""
    torch.manual_seed(0)
    mine = FactorizableMultiheadAttention(64, 4, add_bias_kv=True)
    packed = torch.cat([mine.q_proj.weight, mine.k_proj.weight, mine.v_proj.weight]).detach()
    bound = (6 / (64 + 3 * 64)) ** 0.5
    assert packed.abs().max() <= bound and packed.abs().max() > 0.9 * bound
    assert not any(p.bias.any() for p in (mine.q_proj, mine.k_proj, mine.v_proj, mine.out_proj))
    assert torch.isfinite(mine.bias_k).all() and 0 < mine.bias_k.std() < 1


def test_every_projection_counts_the_flops_of_every_token():
    """out_proj runs on torch's sequence-first layout inside; it still counts one sample's 10 tokens."""
    torch.manual_seed(0)
    model = TinyTransformer(dim=16, layers=1)
    report = decompose_model(model, policy="fixed", rank=4, example_input=torch.randn(3, 10, 8))
    flops = {layer.name.rsplit(".", 1)[-1]: layer.flops_before for layer in report.decomposed}
    assert flops["q_proj"] == flops["out_proj"] == 2 * 10 * 16 * 16
    assert flops["linear1"] == 2 * 10 * 16 * 32
