"""A seed sweep over ``rank.ratio``: a metric's mean and 95 % interval against compression, a line per freeze."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from lrd_exp.results.figures.common import FREEZE_ABBREV, MARKERS, grid, save, skip, title
from lrd_exp.results.replicates import aggregate_replicates


def versus_compression(df: pd.DataFrame, path: str | os.PathLike[str], metric: str, ylabel: str,
                       baseline: float | None = None) -> Path | None:
    """Per model: ``metric`` (mean over seeds, 95 % interval as error bars) against the rank compression ratio,
    one line per freeze schedule: where accuracy starts to drop, and what freezing adds, at each compression."""
    name = f"{metric}_vs_compression"
    agg = aggregate_replicates(df) if df is not None and not df.empty else pd.DataFrame()
    agg = agg[agg["n_seeds"] > 1] if not agg.empty else agg  # single runs of other tables do not belong here
    if agg.empty or f"{metric}_mean" not in agg or agg["rank_ratio"].nunique() < 2:
        skip(name, "needs a sweep over seed and rank.ratio")
        return None
    agg = agg.assign(_x=pd.to_numeric(agg["rank_ratio"], errors="coerce"),
                     _y=pd.to_numeric(agg[f"{metric}_mean"], errors="coerce"),
                     _e=pd.to_numeric(agg[f"{metric}_ci95"], errors="coerce").fillna(0.0))
    agg = agg[agg["_x"].notna() & agg["_y"].notna()]
    models = list(dict.fromkeys(agg["model"].astype(str)))
    fig, axes = grid(len(models))
    for ax, model in zip(axes, models):
        sub = agg[agg["model"].astype(str) == model]
        for i, (freeze, grp) in enumerate(sub.groupby(sub["freeze"].astype(str), sort=False)):
            grp = grp.sort_values("_x")
            ax.errorbar(grp["_x"], grp["_y"], yerr=grp["_e"], marker=MARKERS[i % len(MARKERS)], capsize=3,
                        label=FREEZE_ABBREV.get(freeze, freeze))
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{model} (n = {int(sub['n_seeds'].min())} seeds)", fontsize=10)
        ax.set_xlabel("parameter compression of each decomposed layer (rank.ratio)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title(f"{ylabel} vs compression (mean, 95 % CI)", agg), fontsize=11)
    return save(fig, path)
