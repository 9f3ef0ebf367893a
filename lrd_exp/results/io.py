"""Files of rows: a job's row and a model file written atomically (on :mod:`lrd_exp.results.atomic`), reading rows
back, and collecting a sweep's rows."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lrd_exp.results.atomic import write_atomic, write_json_atomic
from lrd_exp.results.row import RESULT_FILENAME, is_complete, make_row, rows_to_frame


def write_torch_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` so that readers see the old file or the whole new one, never a truncated one."""
    return write_atomic(path, "wb", lambda fh: torch.save(obj, fh))


def write_result(output_dir: str | os.PathLike[str], row: Mapping[str, Any]) -> Path:
    """Normalise ``row`` with :func:`make_row` and write ``<output_dir>/result.json`` atomically."""
    return write_json_atomic(Path(output_dir) / RESULT_FILENAME, make_row(**dict(row)))


def read_result(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The row stored at ``path``, or None when it is missing, unreadable, corrupt or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_result_files(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``result.json`` below ``sweep_dir`` (any depth, symlinked dirs not followed), sorted."""
    found: list[Path] = []
    for root, dirs, files in os.walk(sweep_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d != "wandb")  # W&B run dirs never hold rows
        if RESULT_FILENAME in files:
            found.append(Path(root) / RESULT_FILENAME)
    return sorted(found)


def _job_key(row: Mapping[str, Any], path: Path) -> str:
    """One key per job dir: the row's own ``output_dir`` when it has one (copies of a job dir then collapse),
    else the real path of the folder that holds the file."""
    out = row.get("output_dir")
    base = Path(out) if isinstance(out, str) and out else path.parent
    try:
        return str(base.resolve())
    except OSError:
        return str(base.absolute())


def _preference(row: Mapping[str, Any], path: Path) -> tuple:
    """Among duplicates keep a complete row, then the copy that sits in its own output_dir, then the newest."""
    out = row.get("output_dir")
    at_home = False
    if isinstance(out, str) and out:
        try:
            at_home = Path(out).resolve() == path.parent.resolve()
        except OSError:
            at_home = False
    return (is_complete(row), at_home, str(row.get("time") or ""))


def collect_rows(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per job dir for every ``result.json`` below ``sweep_dir``; corrupt files skipped with a warning.

    The same job dir found twice (a copied or nested duplicate, or a symlink) yields one row. Rows are
    completed with :func:`make_row` (older rows gain new columns as None) and sorted by
    :data:`SORT_COLUMNS`. An empty sweep gives an empty frame with the contract columns.
    """
    chosen: dict[str, tuple[tuple, dict[str, Any]]] = {}
    for path in find_result_files(sweep_dir):
        row = read_result(path)
        if row is None:
            warnings.warn(f"skipping unreadable or corrupt result file: {path}", stacklevel=2)
            continue
        if not row.get("output_dir"):
            row["output_dir"] = str(path.parent)
        key = _job_key(row, path)
        pref = _preference(row, path)
        if key not in chosen or pref > chosen[key][0]:
            chosen[key] = (pref, row)
    return rows_to_frame(row for _, row in chosen.values())
