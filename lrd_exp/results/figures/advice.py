"""``task=advise``'s frontier: every configuration's speedup against its accuracy proxy, from ``advice.csv``.

A configuration is its grid keys, which the table carries as columns named by their dotted config path
(``rank.ratio``, ``freeze.schedule``; no other column has a dot): the figure reads them there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lrd_exp.results.figures.common import FIGSIZE, numeric_table, save, text, title
from lrd_exp.results.row import is_missing

#: ``task=advise``'s families of configurations, by ``rank.allocation``: their markers on the frontier figure
FAMILY_MARKERS = {"uniform": "o", "global": "^", "fastest": "s"}
ALLOCATION_KEY = "rank.allocation"


def config_keys(df: pd.DataFrame) -> list[str]:
    """The table's grid keys: its columns named by a dotted config path, in order."""
    return [str(c) for c in df.columns if "." in str(c)]


def allocation_family(row: Mapping[str, Any]) -> str:
    """``uniform`` / ``global`` / ``fastest``: the row's ``rank.allocation`` (uniform where the grid has none)."""
    value = text(row.get(ALLOCATION_KEY))
    return value if value in FAMILY_MARKERS else "uniform"


def value_text(value: Any) -> str:
    """A grid value as the configuration's label writes it (``2``, not ``2.0`` as a CSV reads it back)."""
    if is_missing(value):
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def point_label(row: Mapping[str, Any], keys: list[str]) -> str:
    """A frontier point's label: its grid values (the keys are in the legend once); the original, which has
    none, by its ``configuration``."""
    if all(is_missing(row.get(k)) for k in keys):
        return str(row["configuration"])
    return " ".join(value_text(row.get(k)) for k in keys)


def advice_frontier(df: pd.DataFrame, path: str | os.PathLike[str], speed: str = "train_speedup",
                    error: str = "approx_error") -> Path | None:
    """``task=advise``'s table: every configuration's speedup against its accuracy proxy, the frontier joined
    (``frontier``), the recommended one starred (``recommended``)."""
    data = numeric_table("advice frontier", "advice", df, {speed, error, "frontier", "configuration"},
                         (speed, error))
    if data is None or data.empty:
        return None
    fig = Figure(figsize=(FIGSIZE[0] * 1.25, FIGSIZE[1] * 1.1))
    ax = fig.add_subplot(1, 1, 1)
    keys = config_keys(data)
    _draw_points(ax, data, keys, speed, error)
    ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
    kind = "training (time-weighted over the schedule)" if speed.startswith("train") else "inference"
    ax.set_xlabel("accuracy proxy: mean relative approximation error per layer (lower is better)")
    ax.set_ylabel(f"{kind} speedup vs original")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(keys) > 1:
        handles.append(Line2D([], [], linestyle=""))
        labels.append("labels: " + " ".join(k.rsplit(".", 1)[-1] for k in keys))
    ax.legend(handles, labels, fontsize=7, loc="lower right")
    model = ", ".join(sorted({str(m) for m in data.get("model", pd.Series(dtype=str)).dropna()}))
    ax.set_title(title(f"Which configuration to train: {model}" if model else "Which configuration to train", data),
                 fontsize=10)
    return save(fig, path)


def _draw_points(ax, data: pd.DataFrame, keys: list[str], speed: str, error: str) -> None:
    """The frontier joined and labelled, the dominated points grey, a marker per rank allocation, the pick
    starred."""
    front = data[data["frontier"].astype(bool)].sort_values(error)
    rest = data[~data["frontier"].astype(bool)]
    family = data.apply(allocation_family, axis=1)
    ax.plot(front[error], front[speed], "-", color="C0", label="frontier (Pareto-optimal)")
    for name, marker in FAMILY_MARKERS.items():  # uniform ranks (the paper) and rank.allocation's
        f_rest, f_front = (d[family[d.index] == name] for d in (rest, front))
        if len(f_rest) or len(f_front):
            ax.scatter(f_rest[error], f_rest[speed], color="0.65", s=22, marker=marker)
            ax.scatter(f_front[error], f_front[speed], color="C0", s=28, marker=marker,
                       label=f"{name} ranks" + (" (rank.allocation)" if name != "uniform" else ""))
    ax.scatter([], [], color="0.65", s=22, label="dominated")
    for i, (_, r) in enumerate(front.iterrows()):  # values only, the keys once in the legend; left / right in turn
        ax.annotate(point_label(r, keys), (r[error], r[speed]), fontsize=6.5, xytext=(6, -9) if i % 2 else (-6, 5),
                    ha="left" if i % 2 else "right", textcoords="offset points")
    if "recommended" in data.columns and data["recommended"].astype(bool).any():
        rec = data[data["recommended"].astype(bool)]
        ax.scatter(rec[error], rec[speed], marker="*", s=220, color="C3", zorder=5, label="recommended")
