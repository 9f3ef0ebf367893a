"""Device resolution: ``device=auto|cpu|cuda|npu`` to a concrete device, or one line saying what is missing.

Every measurement in this project is a ratio taken on one device in one process, so the device is
resolved once, up front. Huawei Ascend NPUs come through ``torch_npu`` (optional: imported only when asked for).
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

from lrd_exp.config.values import ACCELERATORS


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


def npu_module() -> Any:
    """``torch.npu`` after importing torch_npu."""
    _import_torch_npu()
    npu = getattr(torch, "npu", None)
    if npu is None:
        raise DeviceUnavailableError("device=npu: torch_npu imported but did not register torch.npu")
    return npu


def npu_is_available() -> bool:
    """True when torch_npu imports and sees at least one NPU; never raises."""
    try:
        return bool(npu_module().is_available())
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
        npu = npu_module()
        if not npu.is_available():
            raise DeviceUnavailableError(
                "device=npu: torch_npu is installed but no Ascend NPU is visible "
                "(torch.npu.is_available() is False); check the driver (npu-smi info) and "
                "ASCEND_RT_VISIBLE_DEVICES, or use device=cpu / device=auto"
            )
        index = npu.current_device()
        return DeviceInfo("npu", torch.device("npu", index), str(npu.get_device_name(index)))
    return DeviceInfo("cpu", torch.device("cpu"), cpu_name())
