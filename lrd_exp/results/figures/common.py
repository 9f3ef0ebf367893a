"""What every figure shares: size and style, the variant's legend label, skipping with a reason, saving."""

from __future__ import annotations

import logging
import math
import os
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from lrd_exp.results.row import STATUS_OK, finite_number

log = logging.getLogger("lrd_exp")

DPI = 150
FIGSIZE = (7.0, 4.5)
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*"]

#: ``freeze`` column value -> its legend text
FREEZE_ABBREV = {
    "none": "no freeze",
    "sequential": "seq. freeze",
    "alternating": "alt. freeze",
    "first": "freeze first",
    "last": "freeze last",
    "largest": "freeze largest",
}
#: ``rank_policy`` column value -> its legend text
POLICY_ABBREV = {"none": "original", "quantized": "quant", "optimized": "opt", "energy": "energy",
                 "ratio": "ratio", "fixed": "fixed"}


def skip(name: str, why: str) -> None:
    """Say why figure ``name`` was not drawn (one absent measurement never blocks the other figures)."""
    log.warning("%s: skipped (%s)", name, why)


def numeric_table(name: str, kind: str, df: pd.DataFrame | None, need: set[str],
                  numeric: tuple[str, ...]) -> pd.DataFrame | None:
    """A copy of ``df`` with ``numeric`` columns coerced and rows lacking them dropped; None (skipped) when
    a needed column is missing."""
    if df is None or df.empty or not need <= set(df.columns):
        skip(name, f"needs a {kind} table with columns {sorted(need)}")
        return None
    data = df.copy()
    for col in numeric:
        data[col] = pd.to_numeric(data[col], errors="coerce")
    return data[data[list(numeric)].notna().all(axis=1)]


def text(v: Any) -> str | None:
    """A cell as text, or None when it is missing (None, NaN, an empty or null-like string)."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    s = str(v)
    return None if s in ("", "nan", "None", "<NA>") else s


def freeze_of(row: Any) -> str:
    """A row's ``freeze`` schedule; a missing one is ``none`` (the row trains without freezing)."""
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    return text(get("freeze")) or "none"


def variant_label(row: Any) -> str:
    """Short readable name of a job's variant: rank policy (+ ratio / energy / multiple) and freeze schedule.

    e.g. ``quant r=2 m=8 | seq. freeze``; long enough to tell variants apart, short enough for a legend.
    """
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    if text(get("task")) == "benchmark" and text(get("variant")):
        return str(text(get("variant")))  # bench.variants labels are the user's own names for them
    policy = text(get("rank_policy")) or "?"
    parts = [POLICY_ABBREV.get(policy, policy)]
    ratio, energy = finite_number(get("rank_ratio")), finite_number(get("rank_energy"))
    multiple = finite_number(get("rank_multiple"))
    if policy != "none":
        if policy == "energy" and energy is not None:
            parts.append(f"e={energy:g}")
        elif ratio is not None:
            parts.append(f"r={ratio:g}")
        if policy in ("quantized", "optimized") and multiple is not None:
            parts.append(f"m={multiple:g}")
    freeze = freeze_of(row)
    return f"{' '.join(parts)} | {FREEZE_ABBREV.get(freeze, freeze)}"


def wrap(label: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(label, width=width, break_long_words=True)) or label


def _devices(df: pd.DataFrame) -> str:
    for col in ("device_name", "device"):
        if col in df.columns:
            names = sorted({str(v) for v in df[col].dropna().tolist() if text(v)})
            if names:
                return ", ".join(names)
    return ""


def title(base: str, df: pd.DataFrame) -> str:
    """``base`` with the devices the rows were measured on below it."""
    dev = _devices(df)
    return f"{base}\n({dev})" if dev else base


def save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout notes on crowded figures
        fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of finished jobs (all rows when none is marked ok)."""
    if "status" in df.columns and (df["status"] == STATUS_OK).any():
        return df[df["status"] == STATUS_OK]
    return df


def grid(n: int, width: float = FIGSIZE[0], height: float = FIGSIZE[1]) -> tuple[Figure, list]:
    """A figure with ``n`` panels, two per row when there is more than one."""
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * (1 if ncols == 1 else 1.6), height * nrows))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes
