"""The Lightning plumbing for devices: Trainer kwargs, the device count, and Huawei Ascend NPUs.

Lightning has no NPU accelerator of its own, and it builds mixed precision for ``cuda`` unless told otherwise,
so :func:`npu_trainer_kwargs` hands the Trainer an accelerator instance, a precision plugin built for ``npu``
and, for several devices, DDP over HCCL. Built and plumbing-tested with a fake ``torch_npu``; untested on
hardware.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.accelerators import Accelerator, AcceleratorRegistry
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lrd_exp.config.values import MIXED_PRECISIONS
from lrd_exp.devices.resolve import DeviceInfo, DeviceUnavailableError, npu_is_available, npu_module


def _npu_ids(devices: Any, available: int) -> list[int]:
    """Lightning's device syntax (int, -1, "auto", "0,1", [0, 1]) to NPU indices, checked against ``available``."""
    if isinstance(devices, str):
        s = devices.strip().lower()
        if s in ("auto", "-1"):
            devices = -1
        elif "," in s:
            devices = [int(t) for t in s.split(",") if t.strip()]
        else:
            devices = int(s)
    if isinstance(devices, int):
        if devices == -1:
            ids = list(range(available))
        elif devices <= 0:
            raise MisconfigurationException(
                f"devices={devices}: ask for at least one NPU (or -1 / 'auto' for all)"
            )
        else:
            ids = list(range(devices))
    else:
        ids = [int(i) for i in devices]
    if not ids:
        raise MisconfigurationException("devices: no NPU is visible")
    missing = [i for i in ids if i < 0 or i >= available]
    if missing:
        raise MisconfigurationException(
            f"devices={devices}: NPU(s) {missing} not visible; {available} available"
        )
    return ids


class NPUAccelerator(Accelerator):
    """Lightning accelerator for Huawei Ascend NPUs, backed by ``torch_npu`` (``torch.npu``)."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "npu":
            raise MisconfigurationException(f"Device should be an NPU, got {device} instead")
        npu_module().set_device(device)

    def setup(self, trainer: Any) -> None:
        pass

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        npu = npu_module()
        return dict(npu.memory_stats(device)) if hasattr(npu, "memory_stats") else {}

    def teardown(self) -> None:
        npu = getattr(torch, "npu", None)
        if npu is not None and hasattr(npu, "empty_cache"):
            npu.empty_cache()

    @staticmethod
    def parse_devices(devices: Any) -> list[int]:
        return _npu_ids(devices, NPUAccelerator.auto_device_count())

    @staticmethod
    def get_parallel_devices(devices: Any) -> list[torch.device]:
        return [torch.device("npu", i) for i in devices]

    @staticmethod
    def auto_device_count() -> int:
        try:
            return int(npu_module().device_count())
        except DeviceUnavailableError:
            return 0

    @staticmethod
    def is_available() -> bool:
        return npu_is_available()

    @staticmethod
    def name() -> str:
        return "npu"

    @classmethod
    def register_accelerators(cls, accelerator_registry: Any) -> None:
        accelerator_registry.register(cls.name(), cls, description=cls.__name__, override=True)


def register_npu_accelerator() -> None:
    """Add ``"npu"`` to Lightning's accelerator registry (idempotent), so ``Trainer(accelerator="npu")`` resolves."""
    if "npu" not in AcceleratorRegistry:
        NPUAccelerator.register_accelerators(AcceleratorRegistry)


def _count_devices(devices: Any, auto_count: int) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        s = devices.strip().lower()
        if s in ("auto", "-1"):
            return auto_count
        if "," in s:
            return len([t for t in s.split(",") if t.strip()])
        return int(s)
    return auto_count if devices == -1 else int(devices)


def _hccl_strategy(strategy: Any) -> Any:
    """A DDP strategy instance over HCCL for the names of Lightning's DDP family; other values unchanged."""
    if not isinstance(strategy, str):
        return strategy
    name = "ddp" if strategy == "auto" else strategy
    entry = StrategyRegistry[name] if name in StrategyRegistry else None  # .get() would instantiate
    if entry is None or not issubclass(entry["strategy"], DDPStrategy):
        return strategy
    return entry["strategy"](**entry["init_params"], process_group_backend="hccl")


def npu_trainer_kwargs(precision: str, devices: Any = 1, strategy: Any = "auto") -> dict[str, Any]:
    """Trainer kwargs for Ascend NPUs: accelerator instance, NPU-built mixed precision, DDP over HCCL.

    With a precision plugin the Trainer must not also get ``precision`` (Lightning refuses both),
    so ``precision`` is ``None`` for the mixed modes.
    """
    register_npu_accelerator()
    precision = str(precision)
    kwargs: dict[str, Any] = {"accelerator": NPUAccelerator(), "devices": devices, "plugins": []}
    if precision in MIXED_PRECISIONS:
        kwargs["plugins"].append(MixedPrecision(precision, device="npu"))  # type: ignore[arg-type]
        kwargs["precision"] = None
    else:
        kwargs["precision"] = precision
    n = _count_devices(devices, NPUAccelerator.auto_device_count())
    kwargs["strategy"] = _hccl_strategy(strategy) if n > 1 else strategy
    return kwargs


def trainer_device_kwargs(info: DeviceInfo, devices: Any, precision: str, strategy: Any) -> dict[str, Any]:
    """The device-related ``pl.Trainer`` kwargs (accelerator, devices, precision, strategy, plugins)."""
    if info.accelerator == "npu":
        return npu_trainer_kwargs(precision, devices=devices, strategy=strategy)
    return {
        "accelerator": info.accelerator,
        "devices": devices,
        "precision": precision,
        "strategy": strategy,
        "plugins": None,
    }


def count_devices(accelerator: str, devices: Any) -> int:
    """How many devices Lightning's ``devices`` value (int, -1, "auto", "0,1", [0, 1]) asks for on ``accelerator``."""
    if accelerator == "cuda":
        auto = torch.cuda.device_count()
    elif accelerator == "npu":
        auto = NPUAccelerator.auto_device_count()
    else:
        auto = 1
    try:
        return _count_devices(devices, auto)
    except (TypeError, ValueError):
        return 1
