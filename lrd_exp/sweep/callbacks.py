"""Hydra callbacks: aggregate a multirun into one table when the sweep ends.

Configured in ``conf/config.yaml`` as::

    hydra:
      callbacks:
        aggregate:
          _target_: lrd_exp.sweep.callbacks.AggregateResults

Hydra calls ``on_multirun_end`` in the launching process after every job returned, so the sweep dir then
holds one ``result.json`` per job (failed jobs included: they write a ``failed`` row).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lrd_exp.config.values import enum_value
from lrd_exp.results.io import collect_rows
from lrd_exp.results.row import STATUS_OK
from lrd_exp.results.tables import markdown_table, write_tables
from lrd_exp.results.wandb import log_wandb_table

log = logging.getLogger(__name__)


def failed_jobs_line(df) -> str | None:
    """One line counting the sweep's failed jobs and naming the first error, or None when every job is ok."""
    failed = df[df["status"] != STATUS_OK]
    if failed.empty:
        return None
    first = failed.iloc[0]
    return (f"[lrd_exp] {len(failed)} of {len(df)} jobs failed (status column of results.md); first: "
            f"{first.get('output_dir')}: {first.get('error')}")


class AggregateResults(Callback):
    """Collect every job's row into ``results.csv`` / ``results.md`` in the sweep dir (+ one W&B Table).

    Args:
        wandb: log the W&B Table when the job config also enables W&B (``logger.wandb.enabled``).
        print_table: print the Markdown table to stdout at the end of the sweep.
    """

    def __init__(self, wandb: bool = True, print_table: bool = True, **_: Any) -> None:
        self.wandb = wandb
        self.print_table = print_table

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        if not sweep_dir:
            print("[lrd_exp] aggregate: no hydra.sweep.dir in the config; nothing to aggregate.")
            return
        sweep_dir = Path(str(sweep_dir))
        if not sweep_dir.is_dir():
            print(f"[lrd_exp] aggregate: sweep dir {sweep_dir} does not exist; no results to aggregate.")
            return

        df = collect_rows(sweep_dir)
        if df.empty:
            print(f"[lrd_exp] aggregate: no result.json found under {sweep_dir}; no table written.")
            return

        csv_path, md_path = write_tables(df, sweep_dir)
        n_ok = int((df["status"] == STATUS_OK).sum())
        if self.print_table:
            print(f"\n[lrd_exp] sweep results ({len(df)} jobs, {n_ok} ok): {csv_path}")
            print(markdown_table(df))
            print(f"[lrd_exp] markdown: {md_path}\n")
        note = failed_jobs_line(df)
        if note:
            print(note, file=sys.stderr)
        log.info("aggregated %d rows into %s and %s", len(df), csv_path, md_path)

        if not (self.wandb and bool(OmegaConf.select(config, "logger.wandb.enabled", default=False))):
            return
        mode = str(enum_value(OmegaConf.select(config, "logger.wandb.mode", default="offline")) or "offline")
        project = str(OmegaConf.select(config, "logger.wandb.project", default="lrd-exp") or "lrd-exp")
        entity = OmegaConf.select(config, "logger.wandb.entity", default=None)
        try:
            run_dir = log_wandb_table(
                df,
                project=project,
                group=sweep_dir.resolve().name,
                mode=mode,
                dir=sweep_dir,
                entity=entity,
            )
        except Exception as exc:  # W&B trouble must not turn a finished sweep into a failed command
            log.warning("W&B table logging failed (%s: %s); the CSV/Markdown tables are written.",
                        type(exc).__name__, exc)
            print(f"[lrd_exp] aggregate: W&B table not logged ({type(exc).__name__}: {exc})")
            return
        if run_dir:
            print(f"[lrd_exp] W&B table ({mode}): {run_dir}")
