"""The end-to-end check: the decomposed model against the original on inputs the fit did not use."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrd_exp.decompose import decompose_model
from lrd_exp.decompose.check import DecompositionWarning, OutputCheck, Reference, collapse_warning, main_output
from lrd_exp.decompose.report import LayerReport


# ------------------------------------------------------------------------------------------------ a test model
class InvertedResidual(nn.Module):
    """MobileNet-V2's block: a thin 1x1 expand, a depthwise 3x3, a thin 1x1 project; residual where shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = cin == cout and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


def mobilenet_style(widths: tuple[int, ...] = (16, 24, 24, 24, 24), expand: int = 6) -> nn.Module:
    layers = [nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU6()]
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        layers.append(InvertedResidual(cin, cout, expand, 2 if i in (1, 3) else 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1), size=16, mode="bilinear")
    return (x - x.mean()) / x.std(), torch.tensor(d.target)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Module:
    """The MobileNet-style net trained briefly on 1200 digits (about 5 s)."""
    x, y = digits
    torch.manual_seed(0)
    model = mobilenet_style()
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(4):
        for idx in torch.randperm(1200).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x).argmax(1) == b.eval()(x).argmax(1)).float().mean())


# ------------------------------------------------------------------------------------------------ the numbers
def test_the_check_measures_error_agreement_and_kl_by_hand():
    torch.manual_seed(0)
    model, x = nn.Linear(6, 4), torch.randn(40, 6)
    reference = Reference(model, list(x.split(16)), held_out=True)
    same = reference.compare(copy.deepcopy(model))
    assert (same.rel_error, same.agreement, same.kl, same.images, same.held_out) == (0.0, 1.0, 0.0, 40, True)

    other = copy.deepcopy(model)
    with torch.no_grad():
        other.weight.add_(0.3 * torch.randn_like(other.weight))
        a, b = model(x).double(), other(x).double()
    check = reference.compare(other)
    assert check.rel_error == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-6)
    assert check.agreement == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()))
    kl = (a.softmax(1) * (a.log_softmax(1) - b.log_softmax(1))).sum(1).mean()
    assert check.kl == pytest.approx(float(kl), rel=1e-6)
    assert 0 < check.agreement < 1 and check.damage == check.kl


def test_outputs_of_any_model_are_found():
    logits = torch.randn(2, 3)
    assert main_output({"logits": logits, "loss": torch.tensor(1.0)}) is logits
    assert main_output((torch.tensor([1, 2]), logits)) is logits  # the first floating-point tensor
    assert main_output([{"logits": logits}]) is logits


def test_sequence_outputs_are_subsampled_to_the_same_rows(monkeypatch):
    monkeypatch.setattr("lrd_exp.decompose.check.MAX_ROWS", 50)
    torch.manual_seed(0)
    model, x = nn.Linear(5, 7), torch.randn(4, 30, 5)  # 120 rows of (batch, tokens) per batch
    reference = Reference(model, [x, x + 1], held_out=True)
    assert [o.shape[0] for o in reference.outputs] == [25, 25]
    assert reference.compare(copy.deepcopy(model)).rel_error == 0.0


def test_collapse_warning_names_the_layers_cut_most():
    layers = [LayerReport("a", "svd", "decomposed", (96, 24), ranks=(8,), full_ranks=(24,)),
              LayerReport("b", "svd", "decomposed", (64, 64), ranks=(48,), full_ranks=(64,))]
    low = OutputCheck(images=10, held_out=True, rel_error=0.9, agreement=0.2, kl=2.0)
    message = collapse_warning(low, layers, 0.5)
    assert message.index("a (24 -> 8)") < message.index("b (64 -> 48)")
    assert "rank.exclude=[a,b]" in message and "rank.policy=energy" in message and "task=advise" in message
    assert "\n" not in message
    assert collapse_warning(OutputCheck(10, True, 0.1, 0.6, 0.1), layers, 0.5) is None
    assert collapse_warning(OutputCheck(10, True, 0.1, None, None), layers, 0.5) is None  # no class scores


# ------------------------------------------------------------------------------------------------ in decompose_model
def test_the_report_checks_on_held_out_inputs_or_says_it_reused_the_calibration(trained, digits):
    x, _ = digits
    held = copy.deepcopy(trained)
    report = decompose_model(held, ratio=1.5, calibration=x[:128], evaluation=x[1200:1300], check_images=64)
    assert report.check.held_out and report.check.images == 64
    assert report.check.agreement == pytest.approx(_agreement(trained, held, x[1200:1264]))
    assert "held-out" in report.summary() and report.to_dict()["check"]["images"] == 64

    reused = decompose_model(copy.deepcopy(trained), ratio=1.5, calibration=x[:128])
    assert not reused.check.held_out and reused.check.images == 128
    assert "calibration (no held-out inputs given)" in reused.summary()

    assert decompose_model(copy.deepcopy(trained), ratio=1.5).check is None  # no inputs at all
    assert decompose_model(copy.deepcopy(trained), ratio=1.5, calibration=x[:64], check_images=0).check is None


def test_a_mobilenet_style_model_destroyed_at_ratio_2_warns_and_names_thin_layers(trained, digits):
    """The paper's weight fit at ratio 2 cuts the 24-wide projections to rank 8 and turns most predictions. (The
    activation fit keeps this digits model at 60-90 % agreement: damaged, not destroyed, so no warning there.)"""
    x, _ = digits
    decomposed = copy.deepcopy(trained)
    with pytest.warns(DecompositionWarning, match="likely destroyed") as caught:
        report = decompose_model(decomposed, ratio=2.0, fit="weights", evaluation=x[1200:1456])
    assert len(caught) == 1 and report.warnings and report.check.agreement < 0.5
    assert report.check.agreement == pytest.approx(_agreement(trained, decomposed, x[1200:1456]))
    thin = [layer.name for layer in report.decomposed if min(layer.weight_shape[:2]) <= 24]
    named = report.warnings[0].split("Cut the most: ")[1]
    assert all(name in thin for name in named.split(". Try")[0].replace(",", " ").split() if "." in name)
    assert any(name in named for name in thin)


def test_a_safe_setting_does_not_warn(trained, digits):
    x, _ = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecompositionWarning)
        report = decompose_model(copy.deepcopy(trained), policy="energy", energy=0.99, calibration=x[:256],
                                 evaluation=x[1200:1456])
    assert report.check.agreement >= 0.9 and not report.warnings


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def test_bn_reestimation_on_mismatched_images_is_rejected_by_the_check(trained, digits):
    x, _ = digits
    shifted = x[:256].flip(-1) * 2.0 + 1.0  # another distribution: mirrored, brighter, more contrast
    decomposed = copy.deepcopy(trained)
    before = _bn_buffers(trained)
    report = decompose_model(decomposed, include=["4.expand.0"], ratio=1.5, calibration=shifted,
                             evaluation=x[1200:1456])
    assert report.bn_recalibration == "rejected"
    without, with_bn = report.bn_damage
    assert with_bn > without and report.check.damage == pytest.approx(without)
    after = _bn_buffers(decomposed)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the original statistics, bit for bit
    assert "re-estimation rejected" in report.summary()


def test_bn_reestimation_that_helps_is_kept(trained, digits):
    x, _ = digits
    with pytest.warns(DecompositionWarning):  # the weight fit at ratio 2 destroys it, BatchNorm or not
        report = decompose_model(copy.deepcopy(trained), ratio=2.0, fit="weights", calibration=x[:256],
                                 evaluation=x[1200:1456])
    assert report.bn_recalibration == "kept"
    without, with_bn = report.bn_damage
    assert with_bn <= without and report.check.damage == pytest.approx(with_bn)


def test_bn_reestimation_off_or_absent_is_reported(digits):
    x, _ = digits
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    assert decompose_model(copy.deepcopy(model), policy="ratio", calibration=x[:64],
                           skip_head=False).bn_recalibration == "no BatchNorm"
    assert decompose_model(copy.deepcopy(model), policy="ratio", calibration=x[:64], recalibrate_bn=False,
                           skip_head=False).bn_recalibration == "off"


@pytest.mark.parametrize("key, value, allowed", [("check_images", -1, "a number of images >= 0"),
                                                 ("check_images", 2.5, "a number of images >= 0"),
                                                 ("min_agreement", 1.5, "a fraction in [0, 1]")])
def test_bad_check_keys_stop_with_one_line(key, value, allowed):
    with pytest.raises(ValueError, match=re.escape(f"rank.{key}={value!r} is not allowed: {allowed}")) as err:
        decompose_model(nn.Sequential(nn.Linear(4, 4)), **{key: value})
    assert "\n" not in str(err.value)


def test_a_dict_output_model_is_checked_on_its_logits():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(32, 32), nn.Linear(32, 5)

        def forward(self, input_ids: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.head(torch.relu(self.body(input_ids * scale)))}

    torch.manual_seed(0)
    model = Net()
    batches = [{"input_ids": torch.randn(8, 32), "scale": torch.ones(8, 1)} for _ in range(4)]
    report = decompose_model(model, policy="ratio", ratio=2.0, calibration=batches[:2], evaluation=batches[2:])
    assert report.check.held_out and report.check.images == 16 and report.check.agreement is not None
