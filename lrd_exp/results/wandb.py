"""The W&B Table of a sweep: one run per sweep with every row (offline unless the user turns W&B online)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from lrd_exp.results.row import is_missing


def _wandb_value(value: Any) -> Any:
    if is_missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return value


def _quiet_settings(wandb: Any) -> Any:
    """W&B settings for an aggregate run: no console capture, stats, machine info, git or code upload."""
    return wandb.Settings(
        silent=True,
        console="off",
        x_disable_stats=True,
        x_disable_machine_info=True,
        disable_git=True,
        disable_code=True,
        init_timeout=60,
    )


def _results_payload(wandb: Any, df: pd.DataFrame, table: Any, group: str) -> dict[str, Any]:
    """The Table ``results``, plus a throughput-vs-accuracy scatter when some row has both values."""
    payload: dict[str, Any] = {"results": table}
    y = "top1_decomposed"
    for x in ("train_speedup", "train_ips_decomposed"):
        if x in df.columns and y in df.columns and (df[x].notna() & df[y].notna()).any():
            payload["throughput_vs_accuracy"] = wandb.plot.scatter(
                table, x, y, title=f"{x} vs {y} ({group})"
            )
            break
    return payload


def log_wandb_table(
    df: pd.DataFrame,
    *,
    project: str,
    group: str,
    mode: str = "offline",
    dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    entity: str | None = None,
    tags: list[str] | None = None,
) -> str | None:
    """Log the sweep table as one W&B run (Table ``results`` + a throughput-vs-accuracy scatter).

    One run per sweep (``group`` = sweep id) keeps the comparison in one place. Offline by default; the
    table JSON lands under ``<dir>/wandb/offline-run-*/files/media/table/results_*.table.json`` (see
    :func:`find_wandb_table_files`). Returns the run's directory, or None when ``mode == "disabled"`` or there
    are no rows. The run is always finished, so a failure here cannot leak into a later run.
    """
    if mode == "disabled" or df is None or df.empty:
        return None
    import wandb

    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
    columns = [str(c) for c in df.columns]
    data = [[_wandb_value(v) for v in rec] for rec in df.itertuples(index=False, name=None)]

    run = None
    try:
        run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name or f"aggregate-{group}",
            job_type="aggregate",
            tags=tags,
            dir=None if dir is None else str(dir),
            mode=mode,
            reinit="create_new",
            config={"n_rows": len(df), "sweep": group},
            settings=_quiet_settings(wandb),
        )
        table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        run.log(_results_payload(wandb, df, table, group))
        run_dir = str(getattr(run.settings, "sync_dir", None) or Path(run.dir).parent)
    finally:
        if run is not None:
            run.finish()
        else:
            wandb.finish()
    return run_dir


def find_wandb_table_files(dir: str | os.PathLike[str], key: str = "results") -> list[Path]:
    """The W&B Table JSON files (``{"columns": [...], "data": [[...]]}``) logged under ``key`` below ``dir``.

    ``dir`` may be the ``dir`` given to :func:`log_wandb_table`, its ``wandb/`` folder or a run dir. The
    ``latest-run`` symlink is skipped so each file appears once; oldest first.
    """
    base = Path(dir)
    if not base.exists():
        return []
    seen: set[Path] = set()
    out: list[Path] = []
    for p in base.rglob(f"{key}_*.table.json"):
        if "latest-run" in p.parts or "table" not in p.parent.name:
            continue
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            out.append(p)
    return sorted(out, key=lambda p: (p.stat().st_mtime, str(p)))
