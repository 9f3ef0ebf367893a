"""Hugging Face models through the whole cycle, built from small configs (no weights): decompose with calibration,
backward, freezing, the model file, merge, FLOPs, timing and ONNX, all with dict inputs; GPT-2's ``Conv1D``
projections factorize like ``nn.Linear`` through the layer-type registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lrd_exp import decompose_model, load_decomposed, merge_for_inference, save_decomposed  # noqa: E402
from lrd_exp.decompose import SVDLinear, reconstruct_weight  # noqa: E402
from lrd_exp.decompose import registry as R  # noqa: E402
from lrd_exp.decompose.capture import watch  # noqa: E402
from lrd_exp.deploy import merge as M  # noqa: E402
from lrd_exp.freezing.factors import collect_factors, factor_costs  # noqa: E402
from lrd_exp.freezing.schedule import FreezeSchedule  # noqa: E402
from lrd_exp.timing import layer as TL  # noqa: E402
from lrd_exp.timing.flops import count_flops  # noqa: E402
from lrd_exp.timing.steps import prepare_inference, prepare_train_step  # noqa: E402

SEQ = 16


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                      eos_token_id=0, use_cache=False)


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=3)


def gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config()).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BertForSequenceClassification(bert_config()).eval()


def batches(n: int, size: int = 4, seed: int = 1, vocab: int = 100) -> list[dict[str, torch.Tensor]]:
    """Token batches as a tokenizer gives them: ids (of the first ``vocab`` tokens) and an attention mask with
    padding on half the rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(size, SEQ, dtype=torch.long)
        mask[size // 2:, SEQ - 4:] = 0
        out.append({"input_ids": torch.randint(0, vocab, (size, SEQ), generator=g), "attention_mask": mask})
    return out


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv1d_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Conv1D)]


@pytest.fixture(scope="module")
def gpt2_decomposed():
    """GPT-2 decomposed at ratio 2, fitted to its activations on dict calibration batches."""
    model, original = gpt2(), gpt2()
    names = conv1d_names(model)
    report = decompose_model(model, policy="ratio", ratio=2, calibration=batches(4), example_input=batches(1)[0])
    return original, model, names, report


# ------------------------------------------------------------------------------------------------ registry
def test_conv1d_reads_as_the_linear_it_computes_and_builds_back_as_a_conv1d():
    torch.manual_seed(0)
    layer, x = Conv1D(24, 16), torch.randn(2, 5, 16)  # nf=out=24, nx=in=16: weight stored 16 x 24
    with torch.no_grad():
        layer.bias.normal_()
    assert R.is_linear(layer) and R.linear_type(layer) is R.CONV1D
    assert R.linear_features(layer) == (16, 24)
    w, b = R.linear_weight(layer), R.linear_bias(layer)
    torch.testing.assert_close(nn.functional.linear(x, w, b), layer(x), rtol=1e-6, atol=1e-6)
    dense = R.build_dense(R.CONV1D.name, w, b)
    assert type(dense) is Conv1D and dense.weight.shape == (16, 24)
    torch.testing.assert_close(dense(x), layer(x), rtol=0, atol=0)
    assert not R.is_linear(nn.Conv2d(3, 3, 1)) and not R.is_linear(None)


@pytest.mark.parametrize("fit", ["weights", "activations"])
def test_a_full_rank_factorization_of_a_conv1d_reproduces_it(fit):
    torch.manual_seed(0)
    layer, x = Conv1D(24, 16), torch.randn(3, 7, 16)
    moment = x.reshape(-1, 16).double().T @ x.reshape(-1, 16).double() if fit == "activations" else None
    new = SVDLinear.from_linear(layer, 16, moment=moment)
    assert new.dense_type == R.CONV1D.name and new.ranks == (16,)
    torch.testing.assert_close(reconstruct_weight(new), layer.weight.detach().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new(x), layer(x), rtol=1e-5, atol=1e-5)


class TransposedLinear(nn.Module):
    """A user's own linear-like layer: ``x @ kernel + shift`` with the kernel stored in x out."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.shift = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel + self.shift


def _transposed(cls, weight, bias):
    layer = cls(weight.shape[1], weight.shape[0])
    layer.kernel.copy_(weight.T)
    layer.shift.copy_(bias)
    return layer


def test_a_user_registered_linear_like_type_is_decomposed_saved_and_merged(monkeypatch, tmp_path):
    monkeypatch.setattr(R, "_TYPES", dict(R._TYPES))  # the registration ends with the test
    R.register_linear(TransposedLinear, weight=lambda m: m.kernel.T, bias=lambda m: m.shift, build=_transposed)
    torch.manual_seed(0)
    model = nn.Sequential(TransposedLinear(32, 48), nn.ReLU(), nn.Linear(48, 4))
    fresh = copy.deepcopy(model)
    x = torch.randn(8, 32)
    report = decompose_model(model, policy="ratio", ratio=2, calibration=x)
    (layer,) = report.decomposed
    assert layer.name == "0" and layer.weight_shape == (48, 32) and layer.error_of == "output"
    assert layer.params_after == layer.ranks[0] * (32 + 48) <= 32 * 48 / 2
    save_decomposed(model, tmp_path / "m.pt")
    assert torch.equal(load_decomposed(tmp_path / "m.pt", model=fresh)(x), model(x))
    dense = M.merged_layer(model[0])
    assert type(dense) is TransposedLinear
    torch.testing.assert_close(dense(x), model[0](x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ GPT-2
def test_gpt2_conv1d_projections_are_decomposed_and_the_model_shrinks(gpt2_decomposed):
    original, model, names, report = gpt2_decomposed
    assert len(names) == 8 and {n.rsplit(".", 1)[1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    decomposed = {layer.name: layer for layer in report.decomposed}
    assert sorted(decomposed) == sorted(names)
    assert all(isinstance(model.get_submodule(n), SVDLinear) for n in names)
    shapes = {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32), "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)}
    for name, layer in decomposed.items():
        out_f, in_f = shapes[name.split(".", 3)[3]]
        r = layer.ranks[0]
        assert layer.weight_shape == (out_f, in_f) and layer.factor_shapes == [(r, in_f), (out_f, r)]
        assert layer.params_before == in_f * out_f and layer.params_after == r * (in_f + out_f)
        assert 2 * layer.params_after <= layer.params_before
        assert layer.flops_before == 2 * SEQ * in_f * out_f and layer.flops_after == 2 * SEQ * r * (in_f + out_f)
        assert layer.error_of == "output" and 0 < layer.rel_error < 1
    saved = sum(layer.params_before - layer.params_after for layer in report.decomposed)
    assert report.params_before == count(original) and report.params_after == count(model) == count(original) - saved
    held_out = batches(1, seed=9)[0]
    error = (logits(model, held_out) - logits(original, held_out)).norm() / logits(original, held_out).norm()
    assert error < 0.5


def test_gpt2_the_activation_fit_beats_the_weight_fit_on_the_output():
    """Same ranks, two fits, on text from a narrow vocabulary (activations in few directions, as real text's are):
    on batches the fit did not see, every Conv1D fitted to its outputs is closer to the original layer on the
    original's inputs, and so is the model's output."""
    original, held_out = gpt2(), batches(2, seed=7, vocab=8)
    names = conv1d_names(original)
    inputs = {}
    with watch({n: original.get_submodule(n) for n in names}, lambda n, _m, x, _o: inputs.setdefault(n, x)):
        logits(original, held_out[0])
    ref = torch.cat([logits(original, b) for b in held_out])
    model_error, layer_error = {}, {}
    for fit in ("weights", "activations"):
        model = gpt2()
        decompose_model(model, policy="ratio", ratio=4, fit=fit, calibration=batches(8, vocab=8))
        model_error[fit] = ((torch.cat([logits(model, b) for b in held_out]) - ref).norm() / ref.norm()).item()
        with torch.no_grad():
            layer_error[fit] = torch.tensor([
                ((model.get_submodule(n)(x) - original.get_submodule(n)(x)).norm()
                 / original.get_submodule(n)(x).norm()).item() for n, x in inputs.items()])
    assert len(inputs) == 8 and (layer_error["activations"] < 0.8 * layer_error["weights"]).all(), layer_error
    assert model_error["activations"] < 0.8 * model_error["weights"], model_error


def test_gpt2_trains_and_freezes_through_its_factors(gpt2_decomposed):
    _, model, names, _ = gpt2_decomposed
    model = copy.deepcopy(model).train()
    factors = collect_factors(model)
    assert len(factors) == 2 * len(names)
    schedule = FreezeSchedule({"schedule": "first"}, factors)
    schedule.apply(schedule.frozen_at(0))
    batch = batches(1)[0]
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for f in factors:
        if f.position == "first":
            assert f.module.weight.grad is None and not f.module.weight.requires_grad
        else:
            assert f.module.weight.grad is not None and f.module.weight.grad.abs().sum() > 0
    costs = factor_costs(model, batch)  # a dict input: the factors' weight-gradient FLOPs per sample
    assert costs[f"{names[0]}.first"] == 2 * factors[0].numel * SEQ


def test_gpt2_model_file_round_trip_and_merge_with_dict_inputs(gpt2_decomposed, tmp_path, monkeypatch):
    _, model, names, _ = gpt2_decomposed
    model, batch = copy.deepcopy(model), batches(1, seed=5)[0]
    save_decomposed(model, tmp_path / "gpt2.pt")
    loaded = load_decomposed(tmp_path / "gpt2.pt", model=gpt2(seed=3))
    assert torch.equal(logits(loaded, batch), logits(model, batch))

    # every layer merged (the merged form timed faster): each is a Conv1D again, computing the same function
    monkeypatch.setattr(TL, "time_fn", _merged_faster())  # the per-layer timing merge shares with the rank search
    report = merge_for_inference(model, example_input=batch, warmup=0, steps=1)
    assert report.layers_merged == len(names) == 8
    assert all(type(model.get_submodule(n)) is Conv1D for n in names)
    torch.testing.assert_close(logits(model, batch), logits(loaded, batch), rtol=1e-4, atol=1e-5)
    # a merged model's file loads too: the merged Conv1D keeps the in x out layout (c_proj is square)
    save_decomposed(model, tmp_path / "merged.pt")
    assert torch.equal(logits(load_decomposed(tmp_path / "merged.pt", model=gpt2(seed=4)), batch),
                       logits(model, batch))


def _merged_faster():
    calls = []

    def fake_time_fn(fn, *, warmup, steps, sync):
        calls.append(fn)
        fn()
        return type("T", (), {"median_s": 0.002 if len(calls) % 2 else 0.001})()  # factored, then merged
    return fake_time_fn


def test_gpt2_flops_of_decomposed_conv1d_equal_the_analytic_count(gpt2_decomposed):
    original, model, _, report = gpt2_decomposed
    batch = batches(1)[0]
    one = {k: v[:1] for k, v in batch.items()}
    saved = count_flops(original, one, train=False) - count_flops(model, one, train=False)
    assert saved == report.flops_before - report.flops_after > 0
    torch.manual_seed(0)
    lone = nn.Sequential(Conv1D(48, 32))
    x = torch.randn(1, 10, 32)
    dense_flops = count_flops(lone, x, train=False)
    layer = decompose_model(lone, policy="ratio", ratio=2, skip_head=False, example_input=x).decomposed[0]
    assert dense_flops == layer.flops_before == 2 * 10 * 32 * 48
    assert count_flops(lone, x, train=False) == layer.flops_after == 2 * 10 * layer.ranks[0] * (32 + 48)


def test_gpt2_exports_to_onnx_with_dict_inputs(gpt2_decomposed, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    pytest.importorskip("onnxruntime", reason="running ONNX needs the [export] extra")
    from lrd_exp.deploy.export import export_onnx, run_onnx

    _, model, _, _ = gpt2_decomposed
    batch = batches(1, seed=6)[0]
    path = export_onnx(model, batch, tmp_path / "gpt2.onnx")
    out = torch.from_numpy(run_onnx(path, batch))
    torch.testing.assert_close(out, logits(model, batch), rtol=1e-4, atol=1e-5)
    three = {k: v[:3] for k, v in batches(1, seed=8)[0].items()}  # the batch dimension is dynamic
    torch.testing.assert_close(torch.from_numpy(run_onnx(path, three)), logits(model, three), rtol=1e-4,
                               atol=1e-5)


# ------------------------------------------------------------------------------------------------ BERT
def test_bert_whole_cycle_with_dict_inputs(tmp_path):
    model, original, batch = bert(), bert(), batches(1, seed=5)[0]
    labels = torch.tensor([0, 1, 2, 1])
    report = decompose_model(model, policy="ratio", ratio=2, calibration=batches(4), example_input=batch)
    linears = [n for n, m in original.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14 and [layer.name for layer in report.decomposed] == linears[:-1]  # all but the head
    assert all(layer.error_of == "output" and 2 * layer.params_after <= layer.params_before
               for layer in report.decomposed)
    saved = sum(layer.params_before - layer.params_after for layer in report.decomposed)
    assert report.params_after == count(model) == count(original) - saved
    assert saved >= 0.45 * sum(layer.params_before for layer in report.decomposed)
    relative = (logits(model, batch) - logits(original, batch)).norm() / logits(original, batch).norm()
    assert relative < 0.5

    model.train()
    model(**batch, labels=labels).loss.backward()
    assert all(f.module.weight.grad is not None and f.module.weight.grad.abs().sum() > 0
               for f in collect_factors(model))
    model.zero_grad()

    save_decomposed(model, tmp_path / "bert.pt")
    assert torch.equal(logits(load_decomposed(tmp_path / "bert.pt", model=bert(seed=2)), batch),
                       logits(model, batch))
    expected = logits(model, batch)
    merged = merge_for_inference(model, example_input=batch, warmup=0, steps=1)  # real timings: either form
    assert len(merged.layers) == len(report.decomposed)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-4, atol=1e-5)


def test_bert_timing_and_flops_take_dict_inputs():
    model, batch = bert(), batches(1)[0]
    decompose_model(model, policy="ratio", ratio=2, example_input=batch)
    assert prepare_inference(model, batch).time(warmup=0, steps=1).batch_size == 4
    assert prepare_train_step(model, batch, torch.tensor([0, 1, 2, 1])).time(warmup=0, steps=1).median_s > 0
    forward = count_flops(model, batch, train=False)
    assert count_flops(model, batch, train=True) > 2 * forward > 0
