"""Validation top-1 against the fine-tuning epoch, a line per variant: dashed where the variant does not freeze."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from lrd_exp.results.figures.common import FIGSIZE, MARKERS, numeric_table, save, skip, text, title, wrap


def frozen_variants(curves: pd.DataFrame) -> dict[str, bool]:
    """Whether each variant freezes factors while it fine-tunes, from its rows' ``freeze`` column (``none`` or
    missing: it does not). A table without the column says nothing: no variant is listed."""
    if "freeze" not in curves.columns:
        return {}
    out = {}
    for variant, grp in curves.groupby("variant", sort=False):
        given = [text(v) for v in grp["freeze"] if text(v)]
        out[str(variant)] = bool(given) and given[0] != "none"
    return out


def convergence(curves_df: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """Validation top-1 vs epoch per variant: does sequential freezing converge faster (paper, CIFAR-10)?

    Variants that do not freeze (``freeze`` none) are dashed; min-max over repeated runs shaded."""
    name = "convergence"
    data = numeric_table(name, "curves", curves_df, {"variant", "epoch", "val_top1"}, ("epoch", "val_top1"))
    if data is None:
        return None
    if data.empty:
        skip(name, "no validation top-1 values")
        return None
    frozen = frozen_variants(data)
    agg = data.groupby(["variant", "epoch"], sort=True)["val_top1"].agg(["mean", "min", "max"]).reset_index()
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    for i, (variant, grp) in enumerate(agg.groupby("variant", sort=False)):
        label = str(variant)
        line = ax.plot(grp["epoch"], grp["mean"], marker=MARKERS[i % len(MARKERS)], markersize=4,
                       linestyle="-" if frozen.get(label, True) else "--", label=wrap(label, 40),
                       color=f"C{i % 10}")[0]
        if (grp["max"] > grp["min"]).any():
            ax.fill_between(grp["epoch"], grp["min"], grp["max"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch (fine-tuning)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title("Convergence: with vs without sequential freezing", curves_df), fontsize=10)
    return save(fig, path)
