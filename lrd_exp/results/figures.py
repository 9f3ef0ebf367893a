"""Paper figures from sweep tables: throughput vs accuracy, speedup bars, convergence, rank saw-tooth.

Each plotting function takes a DataFrame and a PNG path, returns the path it wrote, or None (after printing
why) when its inputs are missing, so one absent measurement never blocks the other figures. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot state, any backend, safe in tests and servers).
"""

from __future__ import annotations

import math
import os
import textwrap
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lrd_exp.results.io import collect_rows, read_result
from lrd_exp.results.replicates import aggregate_replicates, mean_ci95
from lrd_exp.results.row import RESULT_FILENAME, STATUS_OK, finite_number

DPI = 150
FIGSIZE = (7.0, 4.5)
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*"]

_FREEZE_ABBREV = {
    "none": "no freeze",
    "sequential": "seq. freeze",
    "alternating": "alt. freeze",
    "first": "freeze first",
    "last": "freeze last",
    "largest": "freeze largest",
}
_POLICY_ABBREV = {"none": "original", "quantized": "quant", "optimized": "opt", "energy": "energy",
                  "ratio": "ratio", "fixed": "fixed"}


# ------------------------------------------------------------------------------------------- helpers


def _skip(name: str, why: str) -> None:
    print(f"[figures] {name}: skipped ({why})")


def _numeric_table(name: str, kind: str, df: pd.DataFrame | None, need: set[str],
                   numeric: tuple[str, ...]) -> pd.DataFrame | None:
    """A copy of ``df`` with ``numeric`` columns coerced and rows lacking them dropped; None (skipped) when
    a needed column is missing."""
    if df is None or df.empty or not need <= set(df.columns):
        _skip(name, f"needs a {kind} table with columns {sorted(need)}")
        return None
    data = df.copy()
    for col in numeric:
        data[col] = pd.to_numeric(data[col], errors="coerce")
    return data[data[list(numeric)].notna().all(axis=1)]


def _txt(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    s = str(v)
    return None if s in ("", "nan", "None", "<NA>") else s


def variant_label(row: Any) -> str:
    """Short readable name of a job's variant: rank policy (+ ratio / energy / multiple) and freeze schedule.

    e.g. ``quant r=2 m=8 | seq. freeze``; long enough to tell variants apart, short enough for a legend.
    """
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    if _txt(get("task")) == "benchmark" and _txt(get("variant")):
        return str(_txt(get("variant")))  # bench.variants labels are the user's own names for them
    policy = _txt(get("rank_policy")) or "?"
    parts = [_POLICY_ABBREV.get(policy, policy)]
    ratio, energy = finite_number(get("rank_ratio")), finite_number(get("rank_energy"))
    multiple = finite_number(get("rank_multiple"))
    if policy != "none":
        if policy == "energy" and energy is not None:
            parts.append(f"e={energy:g}")
        elif ratio is not None:
            parts.append(f"r={ratio:g}")
        if policy in ("quantized", "optimized") and multiple is not None:
            parts.append(f"m={multiple:g}")
    freeze = _txt(get("freeze")) or "none"
    return f"{' '.join(parts)} | {_FREEZE_ABBREV.get(freeze, freeze)}"


def _wrap(label: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(label, width=width, break_long_words=True)) or label


def _devices(df: pd.DataFrame) -> str:
    for col in ("device_name", "device"):
        if col in df.columns:
            names = sorted({str(v) for v in df[col].dropna().tolist() if _txt(v)})
            if names:
                return ", ".join(names)
    return ""


def _title(base: str, df: pd.DataFrame) -> str:
    dev = _devices(df)
    return f"{base}\n({dev})" if dev else base


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout notes on crowded figures
        fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "status" in df.columns and (df["status"] == STATUS_OK).any():
        return df[df["status"] == STATUS_OK]
    return df


def _with_speedups(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for out, num, den in (("train_speedup", "train_ips_decomposed", "train_ips_original"),
                          ("infer_speedup", "infer_ips_decomposed", "infer_ips_original")):
        have = pd.to_numeric(df[out], errors="coerce") if out in df.columns else pd.Series(math.nan, index=df.index)
        if num in df.columns and den in df.columns:
            derived = pd.to_numeric(df[num], errors="coerce") / pd.to_numeric(df[den], errors="coerce")
            have = have.fillna(derived)
        df[out] = have
    return df


def _grid(n: int, width: float = FIGSIZE[0], height: float = FIGSIZE[1]) -> tuple[Figure, list]:
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * (1 if ncols == 1 else 1.6), height * nrows))
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n)]
    return fig, axes


# ------------------------------------------------------------------------------------------- figures


def throughput_vs_accuracy(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """Per model: training images/s (x) vs fine-tuned top-1 (y) per variant, the original as a star.

    The paper's claim is a trade-off (faster training at close accuracy), so both axes are shown together.
    """
    name = "throughput_vs_accuracy"
    need = {"model", "train_ips_decomposed", "top1_decomposed"}
    if df is None or df.empty or not need <= set(df.columns):
        _skip(name, f"needs columns {sorted(need)}")
        return None
    data = _ok_rows(df).copy()
    data["_x"] = pd.to_numeric(data["train_ips_decomposed"], errors="coerce")
    data["_y"] = pd.to_numeric(data["top1_decomposed"], errors="coerce")
    data = data[data["_x"].notna() & data["_y"].notna()]
    if data.empty:
        _skip(name, "no row has both train_ips_decomposed and top1_decomposed")
        return None
    data["_variant"] = [variant_label(r) for r in data.to_dict("records")]
    variants = list(dict.fromkeys(data["_variant"]))
    models = list(dict.fromkeys(data["model"].astype(str)))
    fig, axes = _grid(len(models))
    colors = [f"C{i % 10}" for i in range(len(variants))]
    style = {v: (colors[i], _MARKERS[i % (len(_MARKERS) - 1)]) for i, v in enumerate(variants)}  # '*' = original
    for ax, model in zip(axes, models):
        sub = data[data["model"].astype(str) == model]
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
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("training throughput (images/s)")
        ax.set_ylabel("top-1 accuracy, fine-tuned (%)")
        ax.grid(True, alpha=0.3)
        ax.margins(0.12)
    handles = [Line2D([], [], linestyle="", marker=style[v][1], color=style[v][0], markeredgecolor="black",
                      markersize=7, label=v) for v in variants]
    handles.append(Line2D([], [], linestyle="", marker="*", color="gold", markeredgecolor="black", markersize=12,
                          label="original (not decomposed)"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(_title("Training throughput vs accuracy", data), fontsize=11)
    return _save(fig, path)


def versus_compression(df: pd.DataFrame, path: str | os.PathLike[str], metric: str, ylabel: str,
                       baseline: float | None = None) -> Path | None:
    """Per model: ``metric`` (mean over seeds, 95 % interval as error bars) against the rank compression ratio,
    one line per freeze schedule: where accuracy starts to drop, and what freezing adds, at each compression."""
    name = f"{metric}_vs_compression"
    agg = aggregate_replicates(df) if df is not None and not df.empty else pd.DataFrame()
    agg = agg[agg["n_seeds"] > 1] if not agg.empty else agg  # single runs of other tables do not belong here
    if agg.empty or f"{metric}_mean" not in agg or agg["rank_ratio"].nunique() < 2:
        _skip(name, "needs a sweep over seed and rank.ratio")
        return None
    agg = agg.assign(_x=pd.to_numeric(agg["rank_ratio"], errors="coerce"),
                     _y=pd.to_numeric(agg[f"{metric}_mean"], errors="coerce"),
                     _e=pd.to_numeric(agg[f"{metric}_ci95"], errors="coerce").fillna(0.0))
    agg = agg[agg["_x"].notna() & agg["_y"].notna()]
    models = list(dict.fromkeys(agg["model"].astype(str)))
    fig, axes = _grid(len(models))
    for ax, model in zip(axes, models):
        sub = agg[agg["model"].astype(str) == model]
        for i, (freeze, grp) in enumerate(sub.groupby(sub["freeze"].astype(str), sort=False)):
            grp = grp.sort_values("_x")
            ax.errorbar(grp["_x"], grp["_y"], yerr=grp["_e"], marker=_MARKERS[i % len(_MARKERS)], capsize=3,
                        label=_FREEZE_ABBREV.get(freeze, freeze))
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{model} (n = {int(sub['n_seeds'].min())} seeds)", fontsize=10)
        ax.set_xlabel("parameter compression of each decomposed layer (rank.ratio)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(f"{ylabel} vs compression (mean, 95 % CI)", agg), fontsize=11)
    return _save(fig, path)


def speedup_bars(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """Training and inference speedup (decomposed / original images/s) per variant; 1.0 = no gain."""
    name = "speedup_bars"
    if df is None or df.empty or "model" not in df.columns:
        _skip(name, "no rows with a model column")
        return None
    data = _with_speedups(_ok_rows(df))
    data = data[data["train_speedup"].notna() | data["infer_speedup"].notna()]
    if data.empty:
        _skip(name, "no train or inference speedup measured")
        return None
    data = data.assign(_variant=[variant_label(r) for r in data.to_dict("records")])
    models = list(dict.fromkeys(data["model"].astype(str)))
    fig, axes = _grid(len(models))
    series = [("train_speedup", "training", "C0"), ("infer_speedup", "inference", "C1")]
    deployed = pd.to_numeric(data.get("infer_speedup_deployed", pd.Series(dtype=float)), errors="coerce")
    if deployed.notna().any():  # the deployed form (each layer factored or merged, whichever infers faster)
        data = data.assign(infer_speedup_deployed=deployed)
        series.append(("infer_speedup_deployed", "inference, deployed", "C2"))
    width = 0.76 / len(series)
    for ax, model in zip(axes, models):
        sub = data[data["model"].astype(str) == model]
        agg = sub.groupby("_variant", sort=False)[[col for col, _, _ in series]].median()
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
        ax.set_xticklabels([_wrap(v) for v in agg.index], fontsize=7, rotation=0 if len(xs) <= 4 else 30,
                           ha="center" if len(xs) <= 4 else "right")
        ax.set_ylabel("speedup (decomposed / original)")
        ax.set_title(model, fontsize=10)
        top = float(agg.max().max()) if agg.notna().any().any() else 1.0
        ax.set_ylim(0, max(1.2, top) * 1.35)  # headroom for the value labels and the legend
        ax.grid(True, axis="y", alpha=0.3, zorder=0)
        ax.legend(fontsize=8, loc="upper left", ncol=len(series), frameon=False)
    fig.suptitle(_title("Measured speedup per variant (dashed: original = 1.0)", data), fontsize=11)
    return _save(fig, path)


def convergence(curves_df: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """Validation top-1 vs epoch per variant: does sequential freezing converge faster (paper, CIFAR-10)?"""
    name = "convergence"
    data = _numeric_table(name, "curves", curves_df, {"variant", "epoch", "val_top1"}, ("epoch", "val_top1"))
    if data is None:
        return None
    if data.empty:
        _skip(name, "no validation top-1 values")
        return None
    agg = data.groupby(["variant", "epoch"], sort=True)["val_top1"].agg(["mean", "min", "max"]).reset_index()
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
    for i, (variant, grp) in enumerate(agg.groupby("variant", sort=False)):
        label = str(variant)
        low = label.lower()
        frozen = not ("no freeze" in low or "freeze=none" in low or low.endswith("none"))
        line = ax.plot(grp["epoch"], grp["mean"], marker=_MARKERS[i % len(_MARKERS)], markersize=4,
                       linestyle="-" if frozen else "--", label=_wrap(label, 40), color=f"C{i % 10}")[0]
        if (grp["max"] > grp["min"]).any():
            ax.fill_between(grp["epoch"], grp["min"], grp["max"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch (fine-tuning)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(_title("Convergence: with vs without sequential freezing", curves_df), fontsize=10)
    return _save(fig, path)


def rank_saw_tooth(timings_df: pd.DataFrame, path: str | os.PathLike[str], layer: str | None = None) -> Path | None:
    """Measured time vs rank for one layer: the saw-tooth that makes rank quantization pay off.

    ``layer`` defaults to the layer with the most measured ranks. Multiples of 8 and 64 are highlighted;
    rows with ``rank == -1`` (the un-decomposed layer) give a horizontal reference line.
    """
    name = "rank_saw_tooth"
    data = _numeric_table(name, "timings", timings_df, {"layer", "rank", "time_ms"}, ("rank", "time_ms"))
    if data is None:
        return None
    if "objective" not in data.columns:
        data["objective"] = "time"
    data["objective"] = data["objective"].fillna("time").astype(str)
    ranked = data[data["rank"] >= 0]
    if ranked.empty:
        _skip(name, "no timed ranks")
        return None
    if layer is None:
        layer = str(ranked.groupby("layer")["rank"].nunique().sort_values(ascending=False, kind="stable").index[0])
    data = data[data["layer"].astype(str) == str(layer)]
    ranked = data[data["rank"] >= 0]
    if ranked.empty:
        _skip(name, f"layer {layer!r} has no timed ranks")
        return None
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot(1, 1, 1)
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
    ax.set_title(_title(f"Time vs rank, layer {short}", data), fontsize=10)
    return _save(fig, path)


#: ``task=advise``'s families of configurations, by ``rank.allocation``: their markers on the frontier figure
FAMILY_MARKERS = {"uniform": "o", "global": "^", "fastest": "s"}


def allocation_family(configuration: object) -> str:
    """``uniform`` / ``global`` / ``fastest`` from a configuration label (``... allocation=global ...``)."""
    for part in str(configuration).split():
        key, _, value = part.partition("=")
        if key.rsplit(".", 1)[-1] == "allocation" and value in FAMILY_MARKERS:
            return value
    return "uniform"


def advice_frontier(df: pd.DataFrame, path: str | os.PathLike[str], speed: str = "train_speedup",
                    error: str = "approx_error") -> Path | None:
    """``task=advise``'s table: every configuration's speedup against its accuracy proxy, the frontier joined
    (``frontier``), the recommended one starred (``recommended``)."""
    data = _numeric_table("advice frontier", "advice", df, {speed, error, "frontier", "configuration"},
                          (speed, error))
    if data is None or data.empty:
        return None
    fig = Figure(figsize=(FIGSIZE[0] * 1.25, FIGSIZE[1] * 1.1))
    ax = fig.add_subplot(1, 1, 1)
    front = data[data["frontier"].astype(bool)].sort_values(error)
    rest = data[~data["frontier"].astype(bool)]
    ax.plot(front[error], front[speed], "-", color="C0", label="frontier (Pareto-optimal)")
    for family, marker in FAMILY_MARKERS.items():  # uniform ranks (the paper) and rank.allocation's
        f_rest, f_front = (d[d["configuration"].map(allocation_family) == family] for d in (rest, front))
        if len(f_rest) or len(f_front):
            ax.scatter(f_rest[error], f_rest[speed], color="0.65", s=22, marker=marker)
            ax.scatter(f_front[error], f_front[speed], color="C0", s=28, marker=marker,
                       label=f"{family} ranks" + (" (rank.allocation)" if family != "uniform" else ""))
    ax.scatter([], [], color="0.65", s=22, label="dominated")
    keys = [str(k).split("=")[0] for k in str(front["configuration"].iloc[-1]).split()]
    for i, (_, r) in enumerate(front.iterrows()):  # values only, the keys once in the legend; left / right in turn
        text = " ".join(part.split("=", 1)[-1] for part in str(r["configuration"]).split())
        ax.annotate(text, (r[error], r[speed]), fontsize=6.5, xytext=(6, -9) if i % 2 else (-6, 5),
                    ha="left" if i % 2 else "right", textcoords="offset points")
    if "recommended" in data.columns and data["recommended"].astype(bool).any():
        rec = data[data["recommended"].astype(bool)]
        ax.scatter(rec[error], rec[speed], marker="*", s=220, color="C3", zorder=5, label="recommended")
    ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
    kind = "training (time-weighted over the schedule)" if speed.startswith("train") else "inference"
    ax.set_xlabel("accuracy proxy: mean relative approximation error per layer (lower is better)")
    ax.set_ylabel(f"{kind} speedup vs original")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if len(keys) > 1:
        handles.append(Line2D([], [], linestyle=""))
        labels.append("labels: " + " ".join(keys))
    ax.legend(handles, labels, fontsize=7, loc="lower right")
    model = ", ".join(sorted({str(m) for m in data.get("model", pd.Series(dtype=str)).dropna()}))
    ax.set_title(_title(f"Which configuration to train: {model}" if model else "Which configuration to train", data),
                 fontsize=10)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- loading


def classify_csv(df: pd.DataFrame) -> str:
    """What a CSV holds, from its columns: ``timings``, ``curves`` (labelled), ``job_curves`` or ``results``."""
    cols = set(df.columns)
    if {"layer", "rank", "time_ms"} <= cols:
        return "timings"
    if {"variant", "epoch", "val_top1"} <= cols:
        return "curves"
    if {"epoch", "val_top1"} <= cols:
        return "job_curves"
    return "results"


def load_results(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A sweep's table: ``results.csv`` when present (a dir) or the CSV itself, else :func:`collect_rows`."""
    path = Path(path)
    if path.is_dir():
        csv = path / "results.csv"
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
    """Turn one job's ``curves.csv`` (stage, epoch, step, val_top1, ...) into labelled (variant, epoch, val_top1).

    Only rows whose ``stage`` contains ``stage`` are kept (the fine-tuning of the decomposed model), unless no
    row matches, then all rows are kept.
    """
    df = curves.copy()
    if stage and "stage" in df.columns:
        match = df["stage"].astype(str).str.contains(stage, case=False, na=False)
        if match.any():
            df = df[match]
    label = variant_label(row) if row else "unknown variant"
    if row and _txt(row.get("model")):
        label = f"{row['model']}: {label}"
    out = pd.DataFrame({"variant": label, "epoch": df["epoch"], "val_top1": df["val_top1"],
                        "device_name": (row or {}).get("device_name")})
    return out.dropna(subset=["val_top1"])


def load_curves(dirs: Iterable[str | os.PathLike[str]], stage: str | None = "fine") -> pd.DataFrame:
    """Every job's ``curves.csv`` under ``dirs``, labelled by its job's rank policy and freeze schedule."""
    frames = []
    for p in _find(dirs, "curves.csv"):
        try:
            frames.append(label_job_curves(pd.read_csv(p), job_row(p), stage))
        except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
            print(f"[figures] skipping {p}: {exc}")
    if not frames:
        return pd.DataFrame(columns=["variant", "epoch", "val_top1"])
    return pd.concat(frames, ignore_index=True)


def load_timings(dirs: Iterable[str | os.PathLike[str]]) -> pd.DataFrame:
    """Every ``rank_timings.csv`` under ``dirs`` (the rank optimizer's measurements), concatenated."""
    frames = []
    for p in _find(dirs, "rank_timings.csv"):
        try:
            frames.append(pd.read_csv(p))
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            print(f"[figures] skipping {p}: {exc}")
    if not frames:
        return pd.DataFrame(columns=["layer", "rank", "time_ms", "objective", "device_name"])
    return pd.concat(frames, ignore_index=True).drop_duplicates()
