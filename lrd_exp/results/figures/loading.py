"""The figures' inputs from disk: a sweep's table, every job's curves (labelled by the job's own row) and the
rank search's timings; a CSV recognised by its columns."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from lrd_exp.results.figures.common import log, text, variant_label
from lrd_exp.results.files import CURVES_FILENAME, RESULT_FILENAME, TABLE_FILENAME, TIMINGS_FILENAME
from lrd_exp.results.io import collect_rows, read_result

#: the columns of a labelled curves table (``freeze`` too, when its rows came from jobs)
CURVES_COLUMNS = ["variant", "epoch", "val_top1"]


def classify_csv(df: pd.DataFrame) -> str:
    """What a CSV holds, from its columns: ``timings``, ``curves`` (labelled), ``job_curves`` or ``results``."""
    cols = set(df.columns)
    if {"layer", "rank", "time_ms"} <= cols:
        return "timings"
    if set(CURVES_COLUMNS) <= cols:
        return "curves"
    if {"epoch", "val_top1"} <= cols:
        return "job_curves"
    return "results"


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A sweep's table: ``results.csv`` when present (a dir) or the CSV itself, else :func:`collect_rows`."""
    path = Path(path)
    if path.is_dir():
        csv = path / TABLE_FILENAME
        return pd.read_csv(csv) if csv.is_file() else collect_rows(path)
    return pd.read_csv(path)


def _find(dirs: Iterable[str | os.PathLike[str]], filename: str) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        for root, sub, files in os.walk(d):
            sub[:] = sorted(s for s in sub if s != "wandb")
            if filename in files:
                out.append(Path(root) / filename)
    return sorted(out)


def job_row(curves_path: Path) -> dict[str, Any]:
    """The result.json of the job that wrote ``curves_path`` (same dir or a parent within 2 levels)."""
    for d in [curves_path.parent, *list(curves_path.parents)[1:3]]:
        row = read_result(d / RESULT_FILENAME)
        if row is not None:
            return row
    return {}


def label_job_curves(curves: pd.DataFrame, row: dict[str, Any], stage: str | None = "fine") -> pd.DataFrame:
    """Turn one job's ``curves.csv`` (stage, epoch, step, val_top1, ...) into labelled (variant, epoch, val_top1),
    with the job's ``freeze`` and ``device_name`` columns.

    Only rows whose ``stage`` contains ``stage`` are kept (the fine-tuning of the decomposed model), unless no
    row matches, then all rows are kept.
    """
    df = curves.copy()
    if stage and "stage" in df.columns:
        match = df["stage"].astype(str).str.contains(stage, case=False, na=False)
        if match.any():
            df = df[match]
    label = variant_label(row) if row else "unknown variant"
    if row and text(row.get("model")):
        label = f"{row['model']}: {label}"
    row = row or {}
    out = pd.DataFrame({"variant": label, "epoch": df["epoch"], "val_top1": df["val_top1"],
                        "freeze": row.get("freeze"), "device_name": row.get("device_name")})
    return out.dropna(subset=["val_top1"])


def load_curves(dirs: Iterable[str | os.PathLike[str]], stage: str | None = "fine") -> pd.DataFrame:
    """Every job's ``curves.csv`` under ``dirs``, labelled by its job's rank policy and freeze schedule."""
    frames = []
    for p in _find(dirs, CURVES_FILENAME):
        try:
            frames.append(label_job_curves(pd.read_csv(p), job_row(p), stage))
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
            log.warning("skipping %s: %s", p, exc)
    if not frames:
        return pd.DataFrame(columns=[*CURVES_COLUMNS, "freeze"])
    return pd.concat(frames, ignore_index=True)


def load_timings(dirs: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """Every ``rank_timings.csv`` under ``dirs`` (the rank optimizer's measurements), concatenated."""
    frames = []
    for p in _find(dirs, TIMINGS_FILENAME):
        try:
            frames.append(pd.read_csv(p))
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            log.warning("skipping %s: %s", p, exc)
    if not frames:
        return pd.DataFrame(columns=["layer", "rank", "time_ms", "objective", "device_name"])
    return pd.concat(frames, ignore_index=True).drop_duplicates()
