"""The model file: saved, loaded without SVD into the exact module (identical outputs), refused with one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

from lrd_exp import decompose_model, load_decomposed, save_decomposed
from lrd_exp.deploy import model_file
from lrd_exp.deploy.model_file import ModelFileError, structure


def decomposed_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    decompose_model(model, policy="quantized", ratio=2, multiple=8, input_size=(1, 32, 32))
    return model.eval()


def test_a_saved_timm_model_loads_without_svd_and_gives_identical_outputs(tmp_path, monkeypatch):
    model = decomposed_resnet()
    path = save_decomposed(model, tmp_path / "model.pt", model_kwargs={"num_classes": 10, "in_chans": 1},
                           rank={"policy": "quantized"}, row={"top1_decomposed": 97.5})
    raw = torch.load(path, weights_only=True)  # plain data and tensors only: no pickled code
    assert raw["model"] == {"name": "resnet18", "kwargs": {"num_classes": 10, "in_chans": 1}}
    assert raw["meta"]["row"]["top1_decomposed"] == 97.5 and raw["layers"] == structure(model)
    import lrd_exp.decompose.functional as Fn

    def no_svd(*a, **k):
        raise AssertionError("loading must not decompose")

    for name in ("svd_basis", "mode_singular", "svd_factors", "tucker2_factors"):
        monkeypatch.setattr(Fn, name, no_svd)
    loaded = load_decomposed(path)
    x = torch.randn(3, 1, 32, 32)
    assert structure(loaded) == structure(model)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training


def test_a_model_that_is_not_in_timm_loads_onto_a_freshly_built_original(tmp_path):
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64),
                             nn.ReLU(), nn.Linear(64, 10))

    torch.manual_seed(1)
    model = build()
    decompose_model(model, policy="ratio", ratio=2, skip_stem=False, skip_head=False, input_size=(3, 8, 8))
    assert {m["kind"] for m in structure(model)} == {"Tucker2Conv", "SVDConv1x1", "SVDLinear"}
    path = save_decomposed(model, tmp_path / "mine.pt")
    with pytest.raises(ModelFileError, match="names no timm model.*model="):
        load_decomposed(path)
    loaded = load_decomposed(path, model=build())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))


def test_files_that_cannot_be_used_stop_with_one_line(tmp_path):
    model = decomposed_resnet()
    path = save_decomposed(model, tmp_path / "model.pt", model_kwargs={"num_classes": 10, "in_chans": 1})
    newer = torch.load(path, weights_only=True)
    newer["version"] = model_file.VERSION + 1
    torch.save(newer, tmp_path / "newer.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases = [
        (tmp_path / "newer.pt", None, "format version 2, written by a newer lrd-exp"),
        (truncated, None, "cannot be read: truncated"),
        (tmp_path / "missing.pt", None, "does not exist"),
        (path, timm.create_model("resnet34", num_classes=10, in_chans=1), "does not fit this model"),
        (path, nn.Sequential(nn.Linear(4, 4)), "does not fit this model: layer 'layer1.0.conv1' is no such layer"),
    ]
    torch.save({"weight": torch.zeros(2)}, tmp_path / "state_dict.pt")
    cases.append((tmp_path / "state_dict.pt", None, "is not an lrd-exp model file"))
    for file, target, needle in cases:
        with pytest.raises(ModelFileError) as info:
            load_decomposed(file, model=target)
        assert needle in str(info.value) and "\n" not in str(info.value), (file, str(info.value))


def test_the_file_loads_in_a_fresh_process(tmp_path):
    model = decomposed_resnet()
    path = save_decomposed(model, tmp_path / "model.pt", model_kwargs={"num_classes": 10, "in_chans": 1})
    x = torch.randn(2, 1, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).detach(), tmp_path / "y.pt")
    code = ("import torch, sys; from lrd_exp import load_decomposed; m = load_decomposed(sys.argv[1]); "
            "x = torch.load(sys.argv[2]); print(torch.equal(m(x), torch.load(sys.argv[3])))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


class _Fused(nn.Module):
    """A user's packed layer: two projections in one parameter, read by its own forward."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * d, d) / d ** 0.5)

    def forward(self, x):
        a, b = torch.nn.functional.linear(x, self.weight).chunk(2, -1)
        return a * torch.sigmoid(b)


class _Split(nn.Module):
    """Its unpacked form: the two projections as linear children."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    @classmethod
    def from_fused(cls, fused: _Fused) -> _Split:
        new = cls(fused.weight.shape[1])
        with torch.no_grad():
            new.a.weight.copy_(fused.weight[: new.a.out_features])
            new.b.weight.copy_(fused.weight[new.a.out_features:])
        return new

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.b(x))


def test_a_user_registered_packed_type_round_trips_through_the_model_file(tmp_path, monkeypatch):
    """register_unpacked is enough for save and load too: the file records the unpacked layer and loading unpacks
    the fresh original's layer the same way (outputs bit-identical)."""
    from lrd_exp.decompose import registry

    monkeypatch.setattr(registry, "_PACKED", dict(registry._PACKED))
    registry.register_unpacked(_Fused, _Split.from_fused)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), _Fused(), nn.Linear(32, 10)).eval()

    model = build()
    report = decompose_model(model, ratio=2, multiple=4, include=["1.*"], skip_head=True)
    assert {lay.name for lay in report.decomposed} == {"1.a", "1.b"}
    path = save_decomposed(model, tmp_path / "m.pt")
    loaded = load_decomposed(path, model=build())
    assert isinstance(loaded[1], _Split)
    x = torch.randn(8, 16)
    assert torch.equal(loaded(x), model(x))
