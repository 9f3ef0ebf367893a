"""Throughput timing and FLOP counting: exact FLOP formulas, timing arithmetic, no side effects."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lrd_exp.devices import resolve_device
from lrd_exp.timing import steps as bench
from lrd_exp.timing.flops import count_flops, count_params
from lrd_exp.timing.steps import Timing, prepare_inference, prepare_train_step, time_fn

B, IN, HID, OUT = 4, 12, 20, 6


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, OUT))


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(8, 5),
    )


# --------------------------------------------------------------------------------------------- FLOPs


def test_linear_forward_flops():
    x = torch.randn(B, IN)
    assert count_flops(nn.Linear(IN, OUT), x, train=False) == 2 * B * IN * OUT


def test_conv_forward_flops():
    cin, cout, k, h = 3, 5, 3, 10
    conv = nn.Conv2d(cin, cout, k, stride=2, padding=1)
    x = torch.randn(B, cin, h, h)
    ho = (h + 2 * 1 - k) // 2 + 1
    assert count_flops(conv, x, train=False) == 2 * B * ho * ho * cout * cin * k * k


def conv_forward_flops(conv: nn.Conv2d | nn.ConvTranspose2d, x_shape: tuple[int, ...]) -> int:
    """2 x positions x out channels x (in channels / groups) x kernel area, per sample; a transposed conv visits
    every input position with (out channels / groups) x kernel area weights per input channel."""
    b, cin, h, w = x_shape
    kh, kw = conv.kernel_size
    if conv.transposed:
        return 2 * b * h * w * cin * (conv.out_channels // conv.groups) * kh * kw
    (ph, pw), (sh, sw) = conv.padding, conv.stride
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    return 2 * b * ho * wo * conv.out_channels * (cin // conv.groups) * kh * kw


@pytest.mark.parametrize("make_conv", [
    lambda: nn.Conv2d(8, 16, 3, padding=1),
    lambda: nn.Conv2d(16, 16, 3, padding=1, stride=2, groups=4),
    lambda: nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
    lambda: nn.ConvTranspose2d(8, 16, 3, stride=2, groups=4),
], ids=["dense", "groups4", "depthwise", "transposed-groups4"])
def test_conv_training_flops_divide_by_groups(make_conv):
    """Grad-input and grad-weight each cost one forward, and only when autograd computes them (torch's own count
    takes a grouped conv's weight gradient for a dense one: groups times too much)."""
    torch.manual_seed(0)
    conv = make_conv()
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())  # pooling counts no FLOPs
    x, y = torch.randn(B, conv.in_channels, 10, 10), torch.randint(0, conv.out_channels, (B,))
    fwd = conv_forward_flops(conv, tuple(x.shape))
    assert count_flops(model, x, train=False) == fwd
    assert count_flops(model, x, y=y, train=True) == fwd + fwd  # grad-weight; the data needs no grad
    assert count_flops(model, x.requires_grad_(True), y=y, train=True) == fwd + 2 * fwd  # and grad-input
    conv.weight.requires_grad_(False)  # frozen weight: its bias still trains, so backward still runs
    assert count_flops(model, x, y=y, train=True) == fwd + fwd
    assert count_flops(model, x.detach(), y=y, train=True) == fwd
    assert x.grad is None and conv.bias.grad is None


def test_efficientnet_like_depthwise_block_training_flops():
    """A depthwise-separable block: the training step costs three forwards at most, not dozens."""
    torch.manual_seed(0)
    dw, pw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.Conv2d(64, 32, 1, bias=False)
    model = nn.Sequential(dw, nn.BatchNorm2d(64), nn.ReLU(), pw, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x, y = torch.randn(8, 64, 32, 32), torch.randint(0, 32, (8,))
    f_dw, f_pw = conv_forward_flops(dw, tuple(x.shape)), conv_forward_flops(pw, (8, 64, 32, 32))
    # forward both; backward: pw grad-input + grad-weight, dw grad-weight only (the data needs no grad)
    assert count_flops(model, x, y=y, train=True) == (f_dw + f_pw) + 2 * f_pw + f_dw


def test_training_flops_respect_frozen_weight():
    """fwd: both GEMMs. bwd: layer 2 grad-input + grad-weight; layer 1 grad-weight only if trainable
    (its grad-input is never needed: the data needs no grad)."""
    model = mlp()
    x, y = torch.randn(B, IN), torch.randint(0, OUT, (B,))
    l1, l2 = 2 * B * IN * HID, 2 * B * HID * OUT

    model[0].weight.requires_grad_(False)  # first layer's weight frozen, its bias still trains
    frozen = count_flops(model, x, train=True, y=y)
    assert frozen == (l1 + l2) + (l2 + l2)

    model[0].weight.requires_grad_(True)
    unfrozen = count_flops(model, x, train=True, y=y)
    assert unfrozen - frozen == 2 * B * IN * HID
    assert unfrozen == (l1 + l2) + (l2 + l2) + l1

    model[2].weight.requires_grad_(False)  # last weight frozen: its grad-input is still needed for layer 1
    assert count_flops(model, x, train=True, y=y) == (l1 + l2) + l2 + l1


def test_count_flops_leaves_model_untouched():
    model = small_cnn().train()
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))
    before = copy.deepcopy(model.state_dict())
    count_flops(model, x, train=True, y=y)
    count_flops(model, x, train=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats and counters restored


def test_count_flops_keeps_each_modules_own_mode():
    """A BatchNorm the user put in eval mode inside a training model stays in eval mode."""
    model = small_cnn().train()
    model[1].eval()
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))
    for train in (True, False):
        count_flops(model, x, train=train, y=y)
        assert [m.training for m in model] == [i != 1 for i in range(len(model))], train


def test_count_params():
    model = mlp()
    total = IN * HID + HID + HID * OUT + OUT
    assert count_params(model) == total
    model[0].weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == total - IN * HID


# --------------------------------------------------------------------------------------------- timing


def test_time_fn_fake_clock():
    durations = [5.0, 1.0, 3.0, 2.0, 4.0]  # the first two are warm-up and must not be timed
    state = {"t": 0.0, "calls": 0, "syncs": 0}

    def fn():
        state["t"] += durations[state["calls"]]
        state["calls"] += 1

    def sync():
        state["syncs"] += 1

    t = time_fn(fn, warmup=2, steps=3, sync=sync, batch_size=8, clock=lambda: state["t"])
    assert state["calls"] == 5 and state["syncs"] == 6
    assert t.times_s == [3.0, 2.0, 4.0]
    assert (t.median_s, t.min_s, t.max_s) == (3.0, 2.0, 4.0)
    assert (
        t.ips == pytest.approx(8 / 3) and t.ips_min == pytest.approx(2.0) and t.ips_max == pytest.approx(4.0)
    )
    assert t.images_per_s(16) == pytest.approx(16 / 3)
    assert t.to_dict()["ips"] == pytest.approx(8 / 3)


def _ticking(step_s: float):
    state = {"t": 0.0, "calls": 0}

    def fn():
        state["t"] += step_s
        state["calls"] += 1

    return fn, state


def test_time_fn_min_time_adds_steps_until_enough_time():
    fn, state = _ticking(0.125)
    t = time_fn(fn, warmup=1, steps=3, sync=lambda: None, clock=lambda: state["t"], min_time_s=1.0)
    assert len(t.times_s) == 8 and state["calls"] == 9  # 8 x 0.125 s = 1 s, plus one warm-up
    fn, state = _ticking(0.5)
    t = time_fn(fn, warmup=0, steps=3, sync=lambda: None, clock=lambda: state["t"], min_time_s=1.0)
    assert len(t.times_s) == 3  # the step count already covers the time
    fn, state = _ticking(0.001)
    t = time_fn(fn, warmup=0, steps=2, sync=lambda: None, clock=lambda: state["t"], min_time_s=10.0, max_steps=7)
    assert len(t.times_s) == 7  # capped
    with pytest.raises(ValueError, match="min_time_s"):
        time_fn(fn, warmup=0, steps=2, sync=lambda: None, min_time_s=-1)


def test_time_fn_real_clock_sleep():
    import time

    t = time_fn(lambda: time.sleep(0.01), warmup=1, steps=3, sync=lambda: None)
    assert 0.009 <= t.min_s <= t.median_s <= t.max_s < 0.5


def test_time_fn_rejects_zero_steps():
    with pytest.raises(ValueError):
        time_fn(lambda: None, warmup=0, steps=0, sync=lambda: None)


def test_measure_train_step_leaves_model_and_respects_frozen():
    model = small_cnn().eval()  # eval on purpose: must still be eval afterwards
    model[0].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))

    seen: list[nn.Parameter] = []
    starts: list[torch.Tensor] = []

    def factory(params):
        seen.extend(params)
        starts.extend(p.detach().clone() for p in params)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    t = prepare_train_step(model, x, y, optimizer_factory=factory).time(warmup=1, steps=2)
    assert isinstance(t, Timing) and len(t.times_s) == 2 and t.batch_size == B
    assert math.isfinite(t.ips) and t.ips > 0 and t.ips_min <= t.ips <= t.ips_max

    # the caller's model is exactly as it was
    assert not model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # the optimizer only got the trainable parameters (of the copy), and they did train
    assert sum(p.numel() for p in seen) == count_params(model, trainable_only=True)
    assert all(p.requires_grad for p in seen)
    assert all(p is not q for p in seen for q in model.parameters())
    assert any(not torch.equal(p.detach(), s) for p, s in zip(seen, starts))


def test_train_step_frozen_weight_gets_no_grad_or_update():
    model = mlp()
    model[0].weight.requires_grad_(False)
    w0 = model[0].weight.detach().clone()
    x, y = torch.randn(B, IN), torch.randint(0, OUT, (B,))
    step = bench.make_train_step(
        model, x, y, optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)
    )
    b0 = model[0].bias.detach().clone()
    for _ in range(2):
        step()
    assert torch.equal(model[0].weight, w0) and model[0].weight.grad is None
    assert not torch.equal(model[0].bias, b0)


class Seen:
    """A forward hook on the caller's module (deep copies carry it to the timed copy): what each call ran under."""

    def __init__(self, module: nn.Module, device_type: str) -> None:
        calls: list[dict[str, object]] = []
        self.calls = calls

        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:  # a function: deepcopy shares it
            on = torch.is_autocast_enabled(device_type)
            cl = torch.channels_last
            calls.append({
                "autocast": torch.get_autocast_dtype(device_type) if on else None,
                "input_channels_last": inputs[0].dim() == 4 and inputs[0].is_contiguous(memory_format=cl),
                "weight_channels_last": module.weight.is_contiguous(memory_format=cl),
                "weight_dtype": module.weight.dtype, "out_dtype": out.dtype, "device": out.device.type,
            })

        self.handle = module.register_forward_hook(hook)

    def __enter__(self) -> Seen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def test_measure_train_step_bf16_channels_last():
    """The copy runs its forward under bf16 autocast with channels_last input and weights; the caller's model
    keeps its dtype and layout."""
    model = small_cnn()
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))
    with Seen(model[0], "cpu") as seen:
        step = prepare_train_step(model, x, y, precision="bf16-mixed", channels_last=True)
        t = step.time(warmup=1, steps=2)
    assert t.ips > 0
    assert len(seen.calls) == 3  # warm-up + timed steps
    for call in seen.calls:
        assert call["autocast"] == torch.bfloat16 and call["out_dtype"] == torch.bfloat16
        assert call["input_channels_last"] and call["weight_channels_last"]
        assert call["weight_dtype"] == torch.float32  # mixed precision: the master weights stay fp32
    with Seen(model[0], "cpu") as seen:  # and the default: no autocast, the usual layout
        prepare_train_step(model, x, y).time(warmup=0, steps=1)
    assert seen.calls[0]["autocast"] is None and seen.calls[0]["out_dtype"] == torch.float32
    assert not seen.calls[0]["input_channels_last"]
    assert next(model.parameters()).dtype == torch.float32
    assert model[0].weight.is_contiguous()  # the caller's layout is untouched
    assert not model[0]._forward_hooks


def test_measure_inference_positive_finite():
    model = small_cnn().train()
    x = torch.randn(B, 3, 8, 8)
    t = prepare_inference(model, x, precision="32-true", device=resolve_device("cpu")).time(warmup=1, steps=3)
    assert len(t.times_s) == 3 and math.isfinite(t.ips) and t.ips > 0
    assert model.training  # eval mode only on the copy


@pytest.mark.parametrize("name", ["fp8", "mixed", "bf16-true-ish"])
def test_unknown_precision_names_are_rejected_naming_the_allowed_values(name):
    with pytest.raises(ValueError, match=f"precision='{name}' is not allowed") as err:
        prepare_inference(mlp(), torch.randn(B, IN), precision=name).time(warmup=0, steps=1)
    for allowed in ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"):
        assert allowed in str(err.value), allowed
    with pytest.raises(ValueError, match="is not allowed"):
        prepare_train_step(mlp(), torch.randn(B, IN), torch.randint(0, OUT, (B,)), precision=name)


@pytest.mark.parametrize("alias,expected", [("32", None), (16, torch.float16), ("bf16", torch.bfloat16)])
def test_precision_aliases_run_as_their_long_form(alias, expected):
    model = small_cnn()
    x, y = torch.randn(B, 3, 8, 8), torch.randint(0, 5, (B,))
    with Seen(model[0], "cpu") as seen:
        prepare_train_step(model, x, y, precision=alias).time(warmup=0, steps=1)
        prepare_inference(model, x, precision=alias).time(warmup=0, steps=1)
    assert [c["autocast"] for c in seen.calls] == [expected, expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_train_and_inference():
    """On the GPU, in each precision: the copy runs there, under autocast in the stated dtype, channels_last."""
    info = resolve_device("cuda")
    model = small_cnn()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 5, (32,))
    for precision, dtype in (("32-true", None), ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)):
        with Seen(model[0], "cuda") as seen:
            kw = dict(precision=precision, channels_last=True, device=info)
            t = prepare_train_step(model, x, y, **kw).time(warmup=2, steps=3)
            assert math.isfinite(t.ips) and t.ips > 0
            t = prepare_inference(model, x, **kw).time(warmup=2, steps=3)
            assert math.isfinite(t.ips) and t.ips > 0
        assert len(seen.calls) == 10, precision
        for call in seen.calls:
            assert call["device"] == "cuda" and call["autocast"] == dtype, (precision, call)
            assert call["out_dtype"] == (dtype or torch.float32), (precision, call)
            assert call["input_channels_last"] and call["weight_channels_last"], (precision, call)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was


@pytest.mark.slow
def test_compile_train_and_inference(monkeypatch):
    """torch.compile path (slow on CPU: inductor compiles C++); warm-up absorbs the compilation. Every step runs
    the compiled graph, and that graph ran under the stated autocast (its logits come out in bf16)."""
    import torch._inductor.compile_fx

    real_compile = torch.compile
    compiled: list[nn.Module] = []
    graph_calls: list[torch.dtype] = []

    def counting_inductor(gm, example_inputs):  # inductor, counting each call of the compiled forward graph
        run = torch._inductor.compile_fx.compile_fx(gm, example_inputs)

        def call(*args):
            out = run(*args)
            graph_calls.append(next(t for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)).dtype)
            return out

        return call

    def spy(module, *args, **kwargs):
        compiled.append(module)
        return real_compile(module, *args, **{**kwargs, "backend": counting_inductor})

    monkeypatch.setattr(torch, "compile", spy)
    torch._dynamo.reset()
    model = mlp()
    x, y = torch.randn(B, IN), torch.randint(0, OUT, (B,))
    t = prepare_train_step(model, x, y, compile=True, precision="bf16-mixed").time(warmup=2, steps=2)
    assert math.isfinite(t.ips) and t.ips > 0
    assert len(compiled) == 1 and compiled[0] is not model  # the copy is compiled
    assert graph_calls == [torch.bfloat16] * 4  # warm-up + timed: every step ran the graph, under bf16 autocast
    graph_calls.clear()
    t = prepare_inference(model, x, compile=True).time(warmup=2, steps=2)
    assert math.isfinite(t.ips) and t.ips > 0
    assert len(compiled) == 2 and graph_calls == [torch.float32] * 4
    assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
