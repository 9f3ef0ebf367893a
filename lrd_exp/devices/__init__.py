"""Where a job runs: device resolution (resolve), the Lightning plumbing and Ascend NPUs (npu), and the opt-in
host allocator tuning (allocator). The names load on first use: resolving a device needs no Lightning."""

from lrd_exp.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lrd_exp.devices.npu": ["NPUAccelerator", "count_devices", "npu_trainer_kwargs", "trainer_device_kwargs"],
    "lrd_exp.devices.resolve": ["DeviceInfo", "DeviceUnavailableError", "cpu_name", "npu_is_available",
                                "resolve_device", "synchronize"],
})
