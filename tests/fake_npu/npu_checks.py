"""NPU plumbing against a fake ``torch_npu`` (run by tests/test_devices.py in a process of its own: the fake, like
the real one, renames torch's PrivateUse1 backend for the rest of the process)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from pytorch_lightning.accelerators import AcceleratorRegistry
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy

from lrd_exp import devices as D
from lrd_exp.devices import DeviceUnavailableError, resolve_device


@pytest.fixture
def fake_npu(monkeypatch):
    """Install a fake ``torch_npu`` + ``torch.npu`` with two devices.

    Real torch_npu renames torch's PrivateUse1 backend to "npu" when imported, so that
    ``torch.device("npu", i)`` parses; the fixture does the same (process-wide and idempotent,
    exactly the side effect a real ``import torch_npu`` has).
    """
    backend = torch._C._get_privateuse1_backend_name()
    if backend not in ("privateuseone", "npu"):
        pytest.skip(f"PrivateUse1 backend already renamed to {backend!r}")
    if backend != "npu":
        torch.utils.rename_privateuse1_backend("npu")

    calls: list[tuple] = []
    npu = types.SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        current_device=lambda: 0,
        get_device_name=lambda i=0: "Ascend910B-fake",
        set_device=lambda d: calls.append(("set_device", d)),
        synchronize=lambda: calls.append(("synchronize",)),
        memory_stats=lambda d=None: {"allocated_bytes.all.current": 0},
        empty_cache=lambda: calls.append(("empty_cache",)),
    )
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    torch.npu = npu
    try:
        yield calls
    finally:
        AcceleratorRegistry.pop("npu", None)
        # the backend rename is process-wide and cannot be undone: leave an "unavailable" npu module behind,
        # or torch.accelerator (used by e.g. AdamW) breaks in every later test
        torch.npu = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0,
                                          current_device=lambda: 0, synchronize=lambda *a: None)


def test_fake_npu_resolves(fake_npu):
    info = resolve_device("npu")
    assert info.accelerator == "npu"
    assert info.torch_device == torch.device("npu", 0)
    assert info.name == "Ascend910B-fake"
    info.synchronize()
    assert fake_npu == [("synchronize",)]
    if not torch.cuda.is_available():
        assert resolve_device("auto").accelerator == "npu"


def test_fake_npu_not_available(fake_npu, monkeypatch):
    monkeypatch.setattr(torch.npu, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="no Ascend NPU is visible"):
        resolve_device("npu")


def test_npu_accelerator_plumbing(fake_npu):
    acc = D.NPUAccelerator()
    assert acc.name() == "npu" and acc.is_available() and acc.auto_device_count() == 2
    assert acc.parse_devices(2) == [0, 1]
    assert acc.parse_devices("auto") == [0, 1]
    assert acc.parse_devices("1,") == [1] and acc.parse_devices([1]) == [1]
    assert acc.get_parallel_devices([0, 1]) == [torch.device("npu", 0), torch.device("npu", 1)]
    with pytest.raises(Exception, match="not visible"):
        acc.parse_devices(3)
    acc.setup_device(torch.device("npu", 1))
    assert fake_npu[-1] == ("set_device", torch.device("npu", 1))
    with pytest.raises(Exception, match="NPU"):
        acc.setup_device(torch.device("cpu"))
    assert acc.get_device_stats(torch.device("npu", 0)) == {"allocated_bytes.all.current": 0}


def test_npu_registered_and_precision_plugin(fake_npu):
    kw = D.npu_trainer_kwargs("bf16-mixed")
    assert "npu" in AcceleratorRegistry
    assert isinstance(kw["accelerator"], D.NPUAccelerator)
    (plugin,) = kw["plugins"]
    assert isinstance(plugin, MixedPrecision) and plugin.device == "npu" and plugin.precision == "bf16-mixed"
    assert kw["precision"] is None  # Lightning refuses precision= together with a precision plugin
    assert kw["strategy"] == "auto"  # one device: no DDP

    kw16 = D.npu_trainer_kwargs("16-mixed")
    assert kw16["plugins"][0].device == "npu" and kw16["plugins"][0].scaler is not None

    kw32 = D.npu_trainer_kwargs("32-true")
    assert kw32["plugins"] == [] and kw32["precision"] == "32-true"


def test_npu_hccl_for_two_devices(fake_npu):
    info = resolve_device("npu")
    kw = D.trainer_device_kwargs(info, 2, "bf16-mixed", "auto")
    assert isinstance(kw["strategy"], DDPStrategy)
    assert kw["strategy"].process_group_backend == "hccl"
    spawn = D.npu_trainer_kwargs("32-true", devices="auto", strategy="ddp_spawn_find_unused_parameters_true")
    assert spawn["strategy"].process_group_backend == "hccl"
    assert spawn["strategy"]._start_method == "spawn"
    assert spawn["strategy"]._ddp_kwargs.get("find_unused_parameters") is True


def test_npu_trainer_builds(fake_npu, tmp_path):
    """The kwargs are accepted by a real Trainer: accelerator, NPU precision plugin and HCCL DDP end up in it."""
    import pytorch_lightning as pl

    kw = D.trainer_device_kwargs(resolve_device("npu"), 2, "bf16-mixed", "auto")
    trainer = pl.Trainer(**kw, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    assert isinstance(trainer.accelerator, D.NPUAccelerator)
    assert isinstance(trainer.precision_plugin, MixedPrecision) and trainer.precision_plugin.device == "npu"
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy.process_group_backend == "hccl"
    assert trainer.strategy.parallel_devices == [torch.device("npu", 0), torch.device("npu", 1)]
