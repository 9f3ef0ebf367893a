"""Tasks a job runs (``task=``): each a function ``(cfg, device, out_dir) -> objective`` that writes its rows.

:func:`run` is the one entry point behind ``run.py`` and the tests: it checks the config and the model checkpoint,
resolves the device, then hands over to the task.

The tasks: train (baseline -> decompose -> fine-tune -> measure -> row), benchmark (throughput only), evaluate (a
saved model), advise (every configuration of a grid measured; advice_report turns the rows into the advice).
What they share, one concern per module: identity (the row's identity: output dir, git, overrides, variant), job
(the row's lifecycle: running, then ok or failed, written, summarised; the sweep objective), settings (the
``bench.*`` settings resolved), models (the run's model, built by one call: a timm name, checkpoint weights, the
cached baseline or a model file; model files read and written), checkpoint
(``model.checkpoint`` read safely and checked), decomposition (what a task gives ``decompose_model`` and demands
back), measure (the measure stage: original vs decomposed as row fields; the timing is lrd_exp.timing.compare's).
"""

from __future__ import annotations

from omegaconf import DictConfig

from lrd_exp.config.schema import enum_value as _v
from lrd_exp.config.validate import validate
from lrd_exp.devices.allocator import tune_malloc
from lrd_exp.devices.resolve import resolve_device
from lrd_exp.distributed.ddp import check_strategy
from lrd_exp.results.row import STATUS_OK
from lrd_exp.tasks.advise import advise
from lrd_exp.tasks.benchmark import benchmark
from lrd_exp.tasks.checkpoint import check_model_checkpoint
from lrd_exp.tasks.decomposition import check_model_selection
from lrd_exp.tasks.evaluate import evaluate
from lrd_exp.tasks.identity import output_dir
from lrd_exp.tasks.job import JobFailed, check_objective, job_rows
from lrd_exp.tasks.train import train

TASKS = {"train": train, "benchmark": benchmark, "evaluate": evaluate, "advise": advise}


def run(cfg: DictConfig) -> float | None:
    """Run one job and write its result row(s); returns the sweep objective (None for a failed job).

    User errors raise :class:`~lrd_exp.config.ConfigError` before any file is written; a job that ran and failed
    raises :class:`JobFailed` after its row (``status: failed``, with the error) is written.
    """
    validate(cfg)
    check_objective(cfg)
    check_strategy(cfg.device.strategy)
    check_model_checkpoint(cfg)
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
