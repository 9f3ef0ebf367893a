"""The deployed (decomposed) model leaves PyTorch: torch.export and ONNX, checked against eager outputs."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from lrd_exp import SVDConv1x1, SVDLinear, Tucker2Conv, decompose_model
from lrd_exp.deploy.export import export_onnx, export_program, run_onnx


def _small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    with torch.no_grad():  # non-trivial BN statistics, so eval vs train mode would show in the outputs
        bn = model[3]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    decompose_model(model, policy="ratio", ratio=2, skip_stem=False, skip_head=False, input_size=(3, 16, 16))
    kinds = {type(m) for m in model.modules()}
    assert {Tucker2Conv, SVDConv1x1, SVDLinear} <= kinds, kinds
    return model


@pytest.fixture
def cnn() -> nn.Sequential:
    return _small_cnn()


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


def test_export_program_matches_eager_and_restores_modes(cnn):
    cnn.train()
    cnn[3].eval()  # a frozen BN inside a training model keeps its own mode
    program = export_program(cnn, torch.randn(2, 3, 16, 16))
    assert isinstance(program, torch.export.ExportedProgram)
    assert cnn.training and not cnn[3].training
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(program.module()(x), _eager(cnn, x))


def test_export_program_dynamic_batch_from_batch_of_one(cnn):
    program = export_program(cnn, torch.randn(1, 3, 16, 16), dynamic_batch=True)
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(program.module()(x), _eager(cnn, x))


def test_onnx_round_trip_dynamic_batch(cnn, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    pytest.importorskip("onnxruntime", reason="running ONNX needs the [export] extra")
    path = export_onnx(cnn, torch.randn(2, 3, 16, 16), tmp_path / "sub" / "cnn.onnx")
    assert path == tmp_path / "sub" / "cnn.onnx" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["cnn.onnx"]  # no temp folder or side file left behind
    x = torch.randn(7, 3, 16, 16)  # a batch the example did not have
    out = run_onnx(path, x)
    assert isinstance(out, np.ndarray) and out.shape == (7, 10)
    np.testing.assert_allclose(out, _eager(cnn, x).numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_static_batch_and_opset(cnn, tmp_path):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the [export] extra")
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    path = export_onnx(cnn, torch.randn(2, 3, 16, 16), tmp_path / "cnn.onnx", opset=18, dynamic_batch=False)
    proto = onnx.load(path)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_timm_resnet18_quantized_onnx(tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    pytest.importorskip("onnxruntime", reason="running ONNX needs the [export] extra")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    decompose_model(model, policy="quantized", ratio=2, multiple=8, input_size=(3, 32, 32))
    assert any(isinstance(m, Tucker2Conv) for m in model.modules())
    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "resnet18.onnx")
    x = torch.randn(3, 3, 32, 32)
    np.testing.assert_allclose(run_onnx(path, x), _eager(model, x).numpy(), rtol=1e-4, atol=1e-4)


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError) as info:
        run_onnx(tmp_path / "absent.onnx", np.zeros((1, 3), dtype=np.float32))
    message = str(info.value)
    assert "onnxruntime" in message and "pip install 'lrd-exp[export]'" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_onnxscript_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"'onnxscript'.*pip install 'lrd-exp\[export\]'"):
        export_onnx(nn.Linear(3, 2), torch.randn(1, 3), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
