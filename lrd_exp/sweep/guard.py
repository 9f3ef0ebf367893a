"""Parallel sweeps that keep timings honest.

Parallel jobs on one machine disturb each other's throughput. The Hydra callback :class:`ParallelThroughputGuard`
(``hydra.callbacks.parallel_guard``) counts how many jobs of a sweep can run at once (joblib ``n_jobs``, every job
of a ``submitit_local`` sweep); when throughput is measured it warns loudly (``action=warn``, the default), forces
``n_jobs=1`` (``serialize``, joblib only) or stops (``error``), and every job's result row records
``parallel_jobs`` (:func:`warn_parallel_throughput`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from lrd_exp.config.values import enum_value as _v

log = logging.getLogger("lrd_exp")

#: Environment variable through which the sweep-level guard tells each job how many jobs run at once.
PARALLEL_ENV = "LRD_PARALLEL_JOBS"
GUARD_ACTIONS = ("warn", "serialize", "error")


def measures_throughput(cfg: Any) -> bool:
    """True when the job times anything: ``task=benchmark`` or ``bench.enabled``."""
    task = _v(OmegaConf.select(cfg, "task", default="train")) if isinstance(cfg, DictConfig) else "train"
    enabled = OmegaConf.select(cfg, "bench.enabled", default=True) if isinstance(cfg, DictConfig) else True
    return str(task) == "benchmark" or bool(enabled)


def sweep_size(overrides: Iterable[str], params: dict[str, Any] | None = None) -> int | None:
    """Jobs in a basic sweep (product of the discrete sweep overrides and ``hydra.sweeper.params``).

    None if not countable.
    """
    items = list(overrides) + [f"{k}={v}" for k, v in (params or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception:
        return None
    n = 1
    for o in parsed:
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                return None
            n *= len(list(o.sweep_string_iterator()))
    return n


def _joblib_workers(n_jobs: Any) -> int:
    n = int(n_jobs if n_jobs is not None else 1)
    cpus = os.cpu_count() or 1
    if n < 0:
        return max(cpus + 1 + n, 1)
    return max(n, 1)


def launcher_kind(launcher: Any) -> str:
    """``basic`` | ``joblib`` | ``submitit_local`` | ``submitit_slurm`` | the launcher's class name."""
    target = str((launcher or {}).get("_target_", "") if hasattr(launcher, "get") else "")
    if not target or target.endswith("BasicLauncher"):
        return "basic"
    if target.endswith("JoblibLauncher"):
        return "joblib"
    if target.endswith("submitit_launcher.LocalLauncher"):
        return "submitit_local"
    if target.endswith("submitit_launcher.SlurmLauncher"):
        return "submitit_slurm"
    return target.rsplit(".", 1)[-1]


def sweep_concurrency(cfg: DictConfig) -> int | None:
    """How many jobs of this multirun can run at the same time on one machine (None: unknown, maybe several)."""
    hydra = cfg.hydra
    sweeper = hydra.get("sweeper", {}) or {}
    total = sweep_size(OmegaConf.to_container(hydra.overrides.task, resolve=False) or [],
                       OmegaConf.to_container(sweeper.get("params"), resolve=False) if sweeper.get("params") else None)
    if sweeper.get("n_jobs") is not None:  # optuna & co: trials launched per batch
        total = int(sweeper.get("n_jobs"))
    if sweeper.get("max_batch_size") is not None and total is not None:
        total = min(total, int(sweeper.get("max_batch_size")))
    kind = launcher_kind(hydra.get("launcher"))
    if kind in ("basic", "submitit_slurm"):  # one after the other / one allocation each
        return 1
    if kind == "joblib":
        workers = _joblib_workers(hydra.launcher.get("n_jobs", 1))
        return min(workers, total) if total is not None else workers
    if kind == "submitit_local":  # submitit's local executor starts every job at once
        return total
    return None


class ParallelThroughputGuard:
    """Hydra callback: parallel jobs on one machine + throughput measurement -> warn (default), serialize or stop.

    Configured in ``conf/config.yaml``::

        hydra:
          callbacks:
            parallel_guard:
              _target_: lrd_exp.sweep.guard.ParallelThroughputGuard
              action: warn      # warn | serialize | error

    ``warn``: one loud message at sweep start and end; every job's row gets ``parallel_jobs`` (> 1: its
    images/s were measured next to other jobs). ``serialize``: joblib runs one job at a time
    (``n_jobs=1``); a ``submitit_local`` sweep cannot be throttled and stops with a hint. ``error``: stops.
    """

    def __init__(self, action: str = "warn", **_: Any) -> None:
        if action not in GUARD_ACTIONS:
            raise ValueError(f"hydra.callbacks.parallel_guard.action={action!r} is not allowed: choose one of "
                             f"{', '.join(GUARD_ACTIONS)}")
        self.action = action
        self.concurrency: int | None = 1
        self.flagged = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        n = sweep_concurrency(config)
        kind = launcher_kind(config.hydra.get("launcher"))
        self.concurrency = n
        self.flagged = (n is None or n > 1) and measures_throughput(config)
        if self.flagged and self.action == "serialize":
            if kind != "joblib":
                raise RuntimeError(
                    f"[lrd_exp] parallel_guard: hydra/launcher={kind} runs every job of this sweep at once and "
                    "cannot be serialized; use the default launcher (drop hydra/launcher) or "
                    "hydra/launcher=joblib, or set bench.enabled=false")
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.launcher.n_jobs = 1
            print(f"[lrd_exp] parallel_guard: throughput is measured, so the joblib launcher runs one job at a "
                  f"time (hydra.launcher.n_jobs {n} -> 1)", file=sys.stderr)
            self.concurrency, self.flagged = 1, False
        os.environ[PARALLEL_ENV] = str(self.concurrency if self.concurrency is not None else 0)
        if not self.flagged:
            return
        what = f"up to {n} jobs" if n is not None else "several jobs (how many is unknown)"
        message = (f"[lrd_exp] WARNING: {what} of this sweep run at the same time on one machine "
                   f"(hydra/launcher={kind}) while throughput is measured: their images/s disturb each other. "
                   "Rows get parallel_jobs > 1; for valid timings run the sweep with hydra.launcher.n_jobs=1 "
                   "(joblib), the default launcher, or one SLURM job per device; or set bench.enabled=false "
                   "for an accuracy-only sweep.")
        if self.action == "error":
            raise RuntimeError(message.replace("WARNING", "parallel_guard (action=error)"))
        print(message, file=sys.stderr)  # stderr, not the logger: Hydra would print it a second time

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.flagged:
            print(f"[lrd_exp] reminder: the images/s of this sweep were measured with {self.concurrency or 'several'} "
                  "jobs in parallel (column parallel_jobs); do not compare them with serial runs.", file=sys.stderr)

    # Hydra calls these too; nothing to do
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None: ...


def parallel_jobs() -> int | None:
    """How many jobs of the current sweep may run at once next to this one (1: alone; None: unknown)."""
    try:
        hydra = HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # pragma: no cover
        hydra = None
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return 1
    value = os.environ.get(PARALLEL_ENV)
    if value is not None:
        n = int(value)
        return n if n > 0 else None
    kind = launcher_kind(hydra.get("launcher"))  # the guard callback is not configured: best guess
    if kind == "joblib":
        return _joblib_workers(hydra.launcher.get("n_jobs", 1))
    if kind == "submitit_local":
        return None
    return 1


def warn_parallel_throughput(cfg: DictConfig) -> int | None:
    """The job's ``parallel_jobs`` column; logs a warning when this job's timings share the machine."""
    n = parallel_jobs()
    if (n is None or n > 1) and measures_throughput(cfg):
        log.warning("this job runs next to %s other job(s) of its sweep on the same machine: its images/s are "
                    "disturbed (result column parallel_jobs=%s)", "some" if n is None else n - 1, n)
    return n
