"""One point or bar per variant of a sweep's single runs: throughput vs accuracy, and the measured speedups."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D

from lrd_exp.results.figures.common import MARKERS, grid, ok_rows, save, skip, title, variant_label, wrap
from lrd_exp.results.replicates import mean_ci95


def throughput_vs_accuracy(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """Per model: training images/s (x) vs fine-tuned top-1 (y) per variant, the original as a star.

    The paper's claim is a trade-off (faster training at close accuracy), so both axes are shown together.
    """
    name = "throughput_vs_accuracy"
    need = {"model", "train_ips_decomposed", "top1_decomposed"}
    if df is None or df.empty or not need <= set(df.columns):
        skip(name, f"needs columns {sorted(need)}")
        return None
    data = ok_rows(df).copy()
    data["_x"] = pd.to_numeric(data["train_ips_decomposed"], errors="coerce")
    data["_y"] = pd.to_numeric(data["top1_decomposed"], errors="coerce")
    data = data[data["_x"].notna() & data["_y"].notna()]
    if data.empty:
        skip(name, "no row has both train_ips_decomposed and top1_decomposed")
        return None
    data["_variant"] = [variant_label(r) for r in data.to_dict("records")]
    variants = list(dict.fromkeys(data["_variant"]))
    models = list(dict.fromkeys(data["model"].astype(str)))
    fig, axes = grid(len(models))
    colors = [f"C{i % 10}" for i in range(len(variants))]
    style = {v: (colors[i], MARKERS[i % (len(MARKERS) - 1)]) for i, v in enumerate(variants)}  # '*' = original
    for ax, model in zip(axes, models):
        _accuracy_panel(ax, data[data["model"].astype(str) == model], style)
        ax.set_title(model, fontsize=10)
    handles = [Line2D([], [], linestyle="", marker=style[v][1], color=style[v][0], markeredgecolor="black",
                      markersize=7, label=v) for v in variants]
    handles.append(Line2D([], [], linestyle="", marker="*", color="gold", markeredgecolor="black", markersize=12,
                          label="original (not decomposed)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title("Training throughput vs accuracy", data), fontsize=11)
    return save(fig, path)


def _accuracy_panel(ax, sub: pd.DataFrame, style: dict[str, tuple[str, str]]) -> None:
    """One model's variants (replicates: their mean with 95 % intervals) and its original as a gold star."""
    for variant, grp in sub.groupby("_variant", sort=False):
        color, marker = style[variant]
        if grp["seed"].nunique() > 1 if "seed" in grp else False:  # replicates: mean and 95 % intervals
            (mx, cx, _), (my, cy, _) = mean_ci95(grp["_x"]), mean_ci95(grp["_y"])
            ax.errorbar([mx], [my], xerr=[cx or 0], yerr=[cy or 0], color=color, marker=marker, markersize=7,
                        markeredgecolor="black", capsize=3, linestyle="", zorder=3)
            continue
        ax.scatter(grp["_x"], grp["_y"], color=color, marker=marker, s=55, edgecolor="black",
                   linewidth=0.5, zorder=3)
    ox = pd.to_numeric(sub.get("train_ips_original"), errors="coerce").dropna()
    oy = pd.to_numeric(sub.get("top1_original"), errors="coerce").dropna()
    if len(ox) and len(oy):
        ax.scatter([ox.median()], [oy.median()], marker="*", s=220, color="gold", edgecolor="black",
                   linewidth=0.8, zorder=4)
    ax.set_xlabel("training throughput (images/s)")
    ax.set_ylabel("top-1 accuracy, fine-tuned (%)")
    ax.grid(True, alpha=0.3)
    ax.margins(0.12)


def _with_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """``train_speedup`` / ``infer_speedup`` filled from the images/s columns where a row lacks them."""
    df = df.copy()
    for out, num, den in (("train_speedup", "train_ips_decomposed", "train_ips_original"),
                          ("infer_speedup", "infer_ips_decomposed", "infer_ips_original")):
        have = pd.to_numeric(df[out], errors="coerce") if out in df.columns else pd.Series(math.nan, index=df.index)
        if num in df.columns and den in df.columns:
            derived = pd.to_numeric(df[num], errors="coerce") / pd.to_numeric(df[den], errors="coerce")
            have = have.fillna(derived)
        df[out] = have
    return df


def speedup_bars(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """Training and inference speedup (decomposed / original images/s) per variant; 1.0 = no gain."""
    name = "speedup_bars"
    if df is None or df.empty or "model" not in df.columns:
        skip(name, "no rows with a model column")
        return None
    data = _with_speedups(ok_rows(df))
    data = data[data["train_speedup"].notna() | data["infer_speedup"].notna()]
    if data.empty:
        skip(name, "no train or inference speedup measured")
        return None
    data = data.assign(_variant=[variant_label(r) for r in data.to_dict("records")])
    models = list(dict.fromkeys(data["model"].astype(str)))
    fig, axes = grid(len(models))
    series = [("train_speedup", "training", "C0"), ("infer_speedup", "inference", "C1")]
    deployed = pd.to_numeric(data.get("infer_speedup_deployed", pd.Series(dtype=float)), errors="coerce")
    if deployed.notna().any():  # the deployed form (each layer factored or merged, whichever infers faster)
        data = data.assign(infer_speedup_deployed=deployed)
        series.append(("infer_speedup_deployed", "inference, deployed", "C2"))
    for ax, model in zip(axes, models):
        sub = data[data["model"].astype(str) == model]
        _speedup_panel(ax, sub.groupby("_variant", sort=False)[[col for col, _, _ in series]].median(), series)
        ax.set_title(model, fontsize=10)
    fig.suptitle(title("Measured speedup per variant (dashed: original = 1.0)", data), fontsize=11)
    return save(fig, path)


def _speedup_panel(ax, agg: pd.DataFrame, series: list[tuple[str, str, str]]) -> None:
    """One model's bars: a group per variant (rows of ``agg``), a bar per speedup column, each labelled."""
    width = 0.76 / len(series)
    xs = list(range(len(agg)))
    for i, (col, label, color) in enumerate(series):
        off = (i - (len(series) - 1) / 2) * width
        vals = agg[col].fillna(0.0).tolist()
        bars = ax.bar([x + off for x in xs], vals, width=width, label=label, color=color, zorder=2)
        for bar, v, missing in zip(bars, vals, agg[col].isna().tolist()):
            ax.annotate("n/a" if missing else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([wrap(v) for v in agg.index], fontsize=7, rotation=0 if len(xs) <= 4 else 30,
                       ha="center" if len(xs) <= 4 else "right")
    ax.set_ylabel("speedup (decomposed / original)")
    top = float(agg.max().max()) if agg.notna().any().any() else 1.0
    ax.set_ylim(0, max(1.2, top) * 1.35)  # headroom for the value labels and the legend
    ax.grid(True, axis="y", alpha=0.3, zorder=0)
    ax.legend(fontsize=8, loc="upper left", ncol=len(series), frameon=False)
