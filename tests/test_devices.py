"""Device resolution, its error messages, and the NPU plumbing tested against a fake ``torch_npu``."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lrd_exp import devices as D
from lrd_exp.config.schema import Accelerator
from lrd_exp.devices import DeviceInfo, DeviceUnavailableError, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this test needs a machine without CUDA")


def test_cpu_resolves():
    info = resolve_device("cpu")
    assert info.accelerator == "cpu"
    assert info.torch_device == torch.device("cpu")
    assert "cores)" in info.name and len(info.name) > len(" (1 cores)")
    info.synchronize()  # no-op


def test_accepts_config_enum():
    assert resolve_device(Accelerator.cpu).accelerator == "cpu"


@pytest.mark.parametrize("cuda,npu,expected", [(True, True, "cuda"), (False, True, "npu"), (False, False, "cpu")])
def test_auto_prefers_cuda_then_npu_then_cpu(monkeypatch, cuda, npu, expected):
    """The order is fixed by hand here: each case fakes which devices exist and checks what ``auto`` picks."""
    from lrd_exp.devices import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "fake GPU")
    monkeypatch.setattr(resolve, "npu_is_available", lambda: npu)
    fake_npu = types.SimpleNamespace(is_available=lambda: npu, current_device=lambda: 0,
                                     get_device_name=lambda i=0: "fake NPU")
    monkeypatch.setattr(resolve, "npu_module", lambda: fake_npu)
    monkeypatch.setattr(torch, "device", lambda *a: ("device", *a))  # "npu" needs the backend renamed
    assert resolve.resolve_device("auto").accelerator == expected


@no_cuda
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(DeviceUnavailableError) as e:
        resolve_device("cuda")
    assert str(e.value) == (
        "device=cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); use device=cpu or device=auto"
    )


def test_npu_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` raise ModuleNotFoundError
    with pytest.raises(
        DeviceUnavailableError, match=r"torch_npu is not installed.*CANN.*pip install torch_npu"
    ):
        resolve_device("npu")
    assert not D.npu_is_available()
    assert not D.NPUAccelerator.is_available()
    assert D.NPUAccelerator.auto_device_count() == 0


def test_unknown_name_lists_allowed():
    with pytest.raises(DeviceUnavailableError) as e:
        resolve_device("tpu")
    msg = str(e.value)
    assert "device.accelerator" in msg and "'tpu'" in msg
    for a in ("auto", "cpu", "cuda", "npu"):
        assert a in msg
    assert "\n" not in msg


def test_synchronize_routing(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(synchronize=lambda: calls.append("npu")), raising=False
    )
    DeviceInfo("cpu", torch.device("cpu"), "cpu").synchronize()
    assert calls == []
    DeviceInfo("cuda", torch.device("cuda", 0), "fake gpu").synchronize()
    assert calls == ["cuda"]
    DeviceInfo("npu", torch.device("cpu"), "fake npu").synchronize()  # torch_device unused by the routing
    assert calls == ["cuda", "npu"]
    D.synchronize("cpu")
    D.synchronize(torch.device("cuda", 0))
    assert calls == ["cuda", "npu", "cuda"]


def test_cpu_and_cuda_trainer_kwargs_pass_through():
    info = DeviceInfo("cpu", torch.device("cpu"), "cpu")
    kw = D.trainer_device_kwargs(info, 1, "bf16-mixed", "auto")
    assert kw == {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "bf16-mixed",
        "strategy": "auto",
        "plugins": None,
    }


# ------------------------------------------------------------------------------------------- fake torch_npu


def test_npu_plumbing_against_a_fake_torch_npu_in_its_own_process():
    """The fake ``torch_npu`` renames torch's PrivateUse1 backend to "npu" for good (as the real one does), so its
    checks run in a fresh process and leave this one, and every later test, as it was."""
    checks = Path(__file__).parent / "fake_npu" / "npu_checks.py"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 passed" in proc.stdout
    assert torch._C._get_privateuse1_backend_name() == "privateuseone" and not hasattr(torch, "npu")
