"""Tasks a job runs (``task=``): each a function ``(cfg, device, out_dir) -> objective`` that writes its rows.

:func:`run` is the one entry point behind ``run.py`` and the tests: it checks the config, resolves the device,
then hands over to the task.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lrd_exp.config.schema import enum_value as _v
from lrd_exp.config.validate import validate
from lrd_exp.devices.allocator import tune_malloc
from lrd_exp.devices.resolve import resolve_device
from lrd_exp.results.io import read_result
from lrd_exp.results.row import RESULT_FILENAME, STATUS_OK
from lrd_exp.tasks.advise import advise
from lrd_exp.tasks.benchmark import benchmark
from lrd_exp.tasks.common import JobFailed, check_model_selection, output_dir
from lrd_exp.tasks.evaluate import evaluate
from lrd_exp.tasks.train import train

TASKS = {"train": train, "benchmark": benchmark, "evaluate": evaluate, "advise": advise}


def job_rows(out_dir: str) -> list[dict]:
    """The rows this job wrote: its own, and one per benchmark variant (``variants/<label>/``)."""
    paths = [Path(out_dir) / RESULT_FILENAME, *sorted(Path(out_dir).glob(f"variants/*/{RESULT_FILENAME}"))]
    return [row for row in map(read_result, paths) if row is not None]


def run(cfg: DictConfig) -> float | None:
    """Run one job and write its result row(s); returns the sweep objective (None for a failed job).

    User errors raise :class:`~lrd_exp.config.ConfigError` before any file is written; a job that ran and failed
    raises :class:`JobFailed` after its row (``status: failed``, with the error) is written.
    """
    validate(cfg)
    check_model_selection(cfg)
    tune_malloc(_v(cfg.device.malloc))
    device = resolve_device(_v(cfg.device.accelerator))
    out_dir = output_dir(cfg)
    value = TASKS[_v(cfg.task)](cfg, device, out_dir)
    failed = [row for row in job_rows(out_dir) if row.get("status") != STATUS_OK]
    if failed:
        raise JobFailed(f"{len(failed)} row(s) failed in {out_dir}: {failed[0].get('error')}")
    return value


__all__ = ["TASKS", "JobFailed", "advise", "benchmark", "evaluate", "run", "train"]
