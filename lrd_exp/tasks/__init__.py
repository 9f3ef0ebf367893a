"""Tasks a job runs (``task=``): each a function ``(cfg, device, out_dir) -> objective`` that writes its rows.

:func:`run` is the one entry point behind ``run.py`` and the tests: it checks the config, resolves the device,
then hands over to the task.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lrd_exp.config.schema import enum_value as _v
from lrd_exp.config.validate import validate
from lrd_exp.devices.allocator import tune_malloc
from lrd_exp.devices.resolve import resolve_device
from lrd_exp.tasks.benchmark import benchmark
from lrd_exp.tasks.common import output_dir
from lrd_exp.tasks.train import train

TASKS = {"train": train, "benchmark": benchmark}


def run(cfg: DictConfig) -> float | None:
    """Run one job and write its result row(s); returns the sweep objective (None for a failed job).

    User errors raise :class:`~lrd_exp.config.ConfigError` before any file is written.
    """
    validate(cfg)
    tune_malloc(_v(cfg.device.malloc))
    device = resolve_device(_v(cfg.device.accelerator))
    return TASKS[_v(cfg.task)](cfg, device, output_dir(cfg))


__all__ = ["TASKS", "benchmark", "run", "train"]
