"""Where a job runs: device resolution (resolve), the Lightning plumbing and Ascend NPUs (npu), and the opt-in
host allocator tuning (allocator)."""

from lrd_exp.devices.npu import NPUAccelerator, count_devices, npu_trainer_kwargs, trainer_device_kwargs
from lrd_exp.devices.resolve import (
    DeviceInfo,
    DeviceUnavailableError,
    cpu_name,
    npu_is_available,
    resolve_device,
    synchronize,
)

__all__ = ["DeviceInfo", "DeviceUnavailableError", "NPUAccelerator", "count_devices", "cpu_name", "npu_is_available",
           "npu_trainer_kwargs", "resolve_device", "synchronize", "trainer_device_kwargs"]
