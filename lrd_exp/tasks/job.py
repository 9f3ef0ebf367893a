"""A job's result row through its life, written once for every task (as lightning-hydra-template's
``task_wrapper``): ``running`` while the job works, then ``ok`` or ``failed`` with the error, never lost, then the
summary. Also the failed row of a job that a user error stopped before it began, the rows a job left, and the
sweep objective of a row."""

from __future__ import annotations

import difflib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from omegaconf import DictConfig

from lrd_exp import results
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.config.validate import ConfigError
from lrd_exp.decompose.calibration import CalibrationError
from lrd_exp.results.row import RESULT_COLUMNS, RESULT_FILENAME, STATUS_FAILED, STATUS_OK, STATUS_RUNNING
from lrd_exp.tasks.identity import identity_row, output_dir

log = logging.getLogger("lrd_exp")

#: The user's input at fault: logged as one line, no traceback.
USER_ERRORS = (ConfigError, CalibrationError)


class JobFailed(RuntimeError):
    """A job ran but failed (its row says ``status: failed`` and why): the command must not look successful."""


class JobRow:
    """``with JobRow(row, out_dir) as job:`` runs the work that fills ``job.row``, then writes the row, whatever
    happened: ``ok``, or ``failed`` with the error, and the duration. An error is logged and stops here, so the next
    variant (or sweep job) still runs; an interrupt is recorded and raised again. ``job.final`` is the written row.

    ``announce``: write the row as ``running`` first, so a killed job leaves a row that says so; ``summary``: print
    the row's summary and path; ``what``: the job's name in the log.
    """

    def __init__(self, row: dict[str, Any], out_dir: str, *, what: str = "job", announce: bool = False,
                 summary: bool = True) -> None:
        row["status"] = STATUS_RUNNING
        self.row, self.out_dir, self.what, self.announce, self.summary = row, out_dir, what, announce, summary
        self.final: dict[str, Any] = {}
        self._on_close: list[Callable[[dict[str, Any]], None]] = []
        self._started = 0.0

    def on_close(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(final row)`` once the row is written (to finish a W&B run with it)."""
        self._on_close.append(fn)

    def __enter__(self) -> JobRow:
        if self.announce:
            results.write_result(self.out_dir, results.make_row(**self.row))
        self._started = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None:
            self.row["status"] = STATUS_OK
        else:
            self.row.update(status=STATUS_FAILED, error=self._error(exc))
        self.row["duration_s"] = round(time.perf_counter() - self._started, 2)
        self.final = results.make_row(**self.row)
        results.write_result(self.out_dir, self.final)
        for fn in self._on_close:
            fn(self.final)
        if self.summary:
            print(results.format_summary(self.final))
            print(f"result row: {os.path.join(self.out_dir, RESULT_FILENAME)}")
        return isinstance(exc, Exception)  # an interrupt (or exit) goes on up

    def _error(self, exc: BaseException) -> str:
        """The row's error, logged: one line for the user's input, with the traceback otherwise."""
        if isinstance(exc, KeyboardInterrupt):
            return "interrupted"
        if isinstance(exc, USER_ERRORS):
            log.error("%s", exc)
        else:
            log.error("%s failed", self.what, exc_info=exc)
        return f"{type(exc).__name__}: {exc}"


def write_failed_row(cfg: DictConfig, error: str) -> str | None:
    """A sweep job stopped by a user error before it began: a failed row, unless a finished one is there."""
    try:
        out_dir = output_dir(cfg)
        path = os.path.join(out_dir, RESULT_FILENAME)
        existing = results.read_result(path)
        if existing and results.is_complete(existing):
            return None  # never replace a finished row
        row = identity_row(cfg, out_dir)
        row.update(status=STATUS_FAILED, error=error, device=_v(cfg.device.accelerator))
        results.write_result(out_dir, results.make_row(**row))
        return path
    except Exception:  # the row is a courtesy: the one-line error is already printed
        log.debug("could not write a failed row", exc_info=True)
        return None


def job_rows(out_dir: str) -> list[dict]:
    """The rows this job wrote: its own, and one per benchmark variant (``variants/<label>/``)."""
    paths = [Path(out_dir) / RESULT_FILENAME, *sorted(Path(out_dir).glob(f"variants/*/{RESULT_FILENAME}"))]
    return [row for row in map(results.read_result, paths) if row is not None]


def check_objective(cfg: DictConfig) -> None:
    """``objective.metric`` names a column of the result row (a typo would hand a sweeper None for every job)."""
    metric = cfg.objective.metric
    if metric not in RESULT_COLUMNS:
        close = difflib.get_close_matches(str(metric), RESULT_COLUMNS, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see lrd_exp.results.row.RESULT_COLUMNS"
        raise ConfigError(f"objective.metric={metric!r} is not a column of the result row{hint}")


def objective_value(cfg: DictConfig, row: dict[str, Any]) -> float | None:
    """The sweep objective: ``objective.metric`` of an ok row, or -drop when top-1 fell too far."""
    if row.get("status") != STATUS_OK:
        return None
    drop, limit = row.get("top1_drop"), cfg.objective.max_top1_drop
    if limit is not None and drop is not None and drop > limit:
        return -float(drop)
    value = row.get(cfg.objective.metric)
    return float(value) if isinstance(value, (int, float)) else None
