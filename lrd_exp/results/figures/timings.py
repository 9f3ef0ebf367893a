"""The rank search's measurements of one layer: time against rank, the saw-tooth that quantization exploits."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lrd_exp.results.figures.common import FIGSIZE, numeric_table, save, skip, title


def rank_saw_tooth(timings_df: pd.DataFrame, path: str | os.PathLike[str], layer: str | None = None) -> Path | None:
    """Measured time vs rank for one layer: the saw-tooth that makes rank quantization pay off.

    ``layer`` defaults to the layer with the most measured ranks. Multiples of 8 and 64 are highlighted;
    rows with ``rank == -1`` (the un-decomposed layer) give a horizontal reference line.
    """
    name = "rank_saw_tooth"
    data = numeric_table(name, "timings", timings_df, {"layer", "rank", "time_ms"}, ("rank", "time_ms"))
    if data is None:
        return None
    if "objective" not in data.columns:
        data["objective"] = "time"
    data["objective"] = data["objective"].fillna("time").astype(str)
    ranked = data[data["rank"] >= 0]
    if ranked.empty:
        skip(name, "no timed ranks")
        return None
    if layer is None:
        layer = str(ranked.groupby("layer")["rank"].nunique().sort_values(ascending=False, kind="stable").index[0])
    data = data[data["layer"].astype(str) == str(layer)]
    if data[data["rank"] >= 0].empty:
        skip(name, f"layer {layer!r} has no timed ranks")
        return None
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    _draw_objectives(ax, data)
    ax.set_xlabel("rank")
    ax.set_ylabel("time (ms)")
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], linestyle="", marker="o", markerfacecolor="none", markeredgecolor="gray", label="rank % 8 == 0"),
        Line2D([], [], linestyle="", marker="s", color="gray", markeredgecolor="black", label="rank % 64 == 0"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    short = str(layer) if len(str(layer)) <= 40 else "..." + str(layer)[-37:]
    ax.set_title(title(f"Time vs rank, layer {short}", data), fontsize=10)
    return save(fig, path)


def _draw_objectives(ax, data: pd.DataFrame) -> None:
    """A line per timing objective (median per rank), its multiples of 8 and 64 marked, the original dashed."""
    ranked = data[data["rank"] >= 0]
    for i, (objective, grp) in enumerate(ranked.groupby("objective", sort=True)):
        grp = grp.groupby("rank", as_index=False)["time_ms"].median().sort_values("rank")
        color = f"C{i % 10}"
        ax.plot(grp["rank"], grp["time_ms"], color=color, linewidth=1, marker=".", markersize=3,
                label=f"{objective}: decomposed")
        r = grp["rank"].astype(int)
        m8 = grp[(r % 8 == 0) & (r % 64 != 0)]
        m64 = grp[r % 64 == 0]
        ax.scatter(m8["rank"], m8["time_ms"], marker="o", s=22, facecolor="none", edgecolor=color, linewidth=1,
                   zorder=3)
        ax.scatter(m64["rank"], m64["time_ms"], marker="s", s=40, color=color, edgecolor="black", zorder=4)
        orig = data[(data["rank"] == -1) & (data["objective"] == objective)]["time_ms"]
        if len(orig):
            ax.axhline(float(orig.median()), color=color, linestyle="--", linewidth=1,
                       label=f"{objective}: original layer")
