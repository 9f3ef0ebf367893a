"""Device resolution (cpu / cuda / npu) and the Lightning plumbing for Ascend NPUs.

Every measurement in this project is a ratio taken on one device in one process, so the device is
resolved once, up front, with an error that says what to change when the requested one is absent.
Huawei Ascend NPUs are supported through ``torch_npu`` (optional: this module imports without it);
Lightning has no NPU accelerator of its own, and it builds mixed precision for ``cuda`` unless told
otherwise, so :func:`npu_trainer_kwargs` hands the Trainer an accelerator instance, a precision plugin
built for ``npu`` and, for several devices, DDP over HCCL.
"""

from __future__ import annotations

import importlib
import os
import platform
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import Any

import torch
from pytorch_lightning.accelerators import Accelerator, AcceleratorRegistry
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.utilities.exceptions import MisconfigurationException

ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "cuda", "npu")
MIXED_PRECISIONS: tuple[str, ...] = ("16-mixed", "bf16-mixed")


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used here; the message names the fix."""


# --------------------------------------------------------------------------------------------- torch_npu


def _import_torch_npu() -> ModuleType:
    """Import ``torch_npu`` (which registers ``torch.npu``), turning failures into one clear line."""
    try:
        return importlib.import_module("torch_npu")
    except ModuleNotFoundError as e:
        if e.name not in (None, "torch_npu"):  # torch_npu is there but one of its dependencies is not
            raise DeviceUnavailableError(
                f"device=npu: torch_npu is installed but failed to import ({e}); check the CANN toolkit "
                "(source its set_env.sh) and that torch_npu matches this torch version"
            ) from e
        raise DeviceUnavailableError(
            "device=npu: torch_npu is not installed; Ascend NPUs need the CANN toolkit and "
            "`pip install torch_npu` matching this torch version; or use device=cpu / device=auto"
        ) from e
    except Exception as e:  # CANN libraries missing, version mismatch, ...
        raise DeviceUnavailableError(
            f"device=npu: torch_npu failed to import ({type(e).__name__}: {e}); check the CANN toolkit "
            "(source its set_env.sh) and that torch_npu matches this torch version"
        ) from e


def _npu_module() -> Any:
    """``torch.npu`` after importing torch_npu."""
    _import_torch_npu()
    npu = getattr(torch, "npu", None)
    if npu is None:
        raise DeviceUnavailableError("device=npu: torch_npu imported but did not register torch.npu")
    return npu


def npu_is_available() -> bool:
    """True when torch_npu imports and sees at least one NPU; never raises."""
    try:
        return bool(_npu_module().is_available())
    except Exception:
        return False


# --------------------------------------------------------------------------------------------- DeviceInfo


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so a host timer measures the work and not its launch."""
    dev = torch.device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "npu":
        torch.npu.synchronize()  # type: ignore[attr-defined]
    # cpu (and anything synchronous): nothing to wait for


@dataclass
class DeviceInfo:
    """The resolved device: what Lightning gets, where tensors go, and a human-readable name."""

    accelerator: str  # "cpu" | "cuda" | "npu": the Trainer's ``accelerator``
    torch_device: torch.device
    name: str

    def synchronize(self) -> None:
        """Block until the device is idle (no-op on CPU)."""
        if self.accelerator == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.accelerator == "npu":
            torch.npu.synchronize()  # type: ignore[attr-defined]


def cpu_name() -> str:
    """CPU model and the number of cores this process may use, e.g. ``AMD EPYC 7R13 (2 cores)``."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    model = line.split(":", 1)[1].strip()
                    if model:
                        break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return f"{model} ({cores} cores)"


def _normalize(accelerator: Any) -> str:
    value = accelerator.value if isinstance(accelerator, Enum) else accelerator
    return str(value).strip().lower()


def resolve_device(accelerator: str | Enum = "auto") -> DeviceInfo:
    """Resolve ``device.accelerator`` to a concrete device, or raise :class:`DeviceUnavailableError`.

    ``auto`` prefers cuda, then npu (torch_npu importable and a device visible), then cpu.
    """
    name = _normalize(accelerator)
    if name not in ACCELERATORS:
        raise DeviceUnavailableError(
            f"device.accelerator={accelerator!r} is not supported; allowed: {', '.join(ACCELERATORS)}"
        )
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif npu_is_available():
            name = "npu"
        else:
            name = "cpu"

    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "device=cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                "use device=cpu or device=auto"
            )
        index = torch.cuda.current_device()
        return DeviceInfo("cuda", torch.device("cuda", index), torch.cuda.get_device_name(index))
    if name == "npu":
        npu = _npu_module()
        if not npu.is_available():
            raise DeviceUnavailableError(
                "device=npu: torch_npu is installed but no Ascend NPU is visible "
                "(torch.npu.is_available() is False); check the driver (npu-smi info) and "
                "ASCEND_RT_VISIBLE_DEVICES, or use device=cpu / device=auto"
            )
        index = npu.current_device()
        return DeviceInfo("npu", torch.device("npu", index), str(npu.get_device_name(index)))
    return DeviceInfo("cpu", torch.device("cpu"), cpu_name())


# --------------------------------------------------------------------------------------------- Lightning


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
        _npu_module().set_device(device)

    def setup(self, trainer: Any) -> None:
        pass

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        npu = _npu_module()
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
            return int(_npu_module().device_count())
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
