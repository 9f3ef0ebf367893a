"""Replicates: jobs that differ only in ``seed`` become one row per configuration, with the mean and the 95 %
confidence interval (Student t) of what a user compares: accuracy, its drop, and the speedups.

One seed cannot tell two variants apart when they differ by a validation image or two; the interval says how
far apart they must be before a table can.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd
from scipy.stats import t as student_t

from lrd_exp.results.row import STATUS_OK, finite_number, own_overrides, split_overrides

#: the metrics summarised over seeds (``<metric>_mean`` and ``<metric>_ci95`` columns)
METRICS = ("top1_original", "top1_decomposed", "top1_drop", "train_speedup", "infer_speedup", "params_ratio",
           "flops_speedup_train", "top1_decomposed_pre", "top1_drop_pre", "finetune_epochs_to_target",
           "finetune_s_to_target", "time_to_target_s", "calibration_s", "decompose_s")
#: null when the target was never reached: their mean is over the seeds that reached it (the table says how many)
TO_TARGET = ("finetune_epochs_to_target", "finetune_s_to_target", "time_to_target_s")
#: what makes two rows the same configuration besides their overrides (the seed and run-specific columns excluded)
CONFIG_COLUMNS = ("model", "dataset", "task", "variant", "rank_policy", "rank_ratio", "rank_multiple", "rank_params",
                  "freeze", "freeze_params", "device", "precision", "batch_size", "channels_last")


def split_seed(overrides: str) -> tuple[str, str | None]:
    """A row's overrides without its ``seed=`` (the configuration), and that seed (None when not given)."""
    tokens = split_overrides(overrides)
    seeds = [t.split("=", 1)[1] for t in tokens if t.lstrip("+~").startswith("seed=")]
    return " ".join(t for t in tokens if not t.lstrip("+~").startswith("seed=")), (seeds[-1] if seeds else None)


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom."""
    return float(student_t.ppf(p, dof))


def mean_ci95(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """(mean, half-width of the 95 % interval, n): ``t_{0.975, n-1} * s / sqrt(n)``; no interval below n = 2."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    n = len(xs)
    if n == 0:
        return None, None, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, None, n
    s = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile(0.975, n - 1) * s / math.sqrt(n), n


def config_keys(df: pd.DataFrame) -> pd.Series:
    """One string per row naming its configuration: the identity columns and the overrides without ``seed``."""
    overrides = df["overrides"] if "overrides" in df.columns else pd.Series([""] * len(df), index=df.index)
    cols = [c for c in CONFIG_COLUMNS if c in df.columns]
    configs = [split_seed(o)[0] if isinstance(o, str) else "" for o in overrides]
    return pd.Series(["|".join(map(str, vals)) + "|" + cfg
                      for vals, cfg in zip(df[cols].itertuples(index=False, name=None), configs)], index=df.index)


def replicated(df: pd.DataFrame) -> pd.Series:
    """True for the rows whose configuration was run with more than one seed."""
    if df.empty or "seed" not in df.columns:
        return pd.Series(False, index=df.index)
    keys = config_keys(df)
    seeds = df.groupby(keys)["seed"].transform("nunique")
    return seeds > 1


def aggregate_replicates(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of the ok rows: its identity, ``n_seeds``, ``seeds`` and the mean and 95 % CI of
    every metric in :data:`METRICS`. Empty when no configuration has two seeds (nothing to aggregate)."""
    if df.empty or "seed" not in df.columns:
        return pd.DataFrame()
    ok = df[df["status"] == STATUS_OK].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["_config"] = [split_seed(o)[0] if isinstance(o, str) else "" for o in ok.get("overrides", [""] * len(ok))]
    keys = [c for c in CONFIG_COLUMNS if c in ok.columns] + ["_config"]
    rows = []
    for _, group in ok.groupby([ok[k].astype(str) for k in keys], sort=False, dropna=False):
        first = group.iloc[0]
        row = {k: first[k] for k in keys if k != "_config"}
        row["overrides"] = first["_config"]
        seeds = sorted({int(s) for s in group["seed"].dropna()})
        row.update(n_seeds=len(seeds), seeds=" ".join(map(str, seeds)))
        if {"top1_original", "top1_decomposed_pre"} <= set(group.columns):
            group = group.assign(top1_drop_pre=pd.to_numeric(group["top1_original"], errors="coerce")
                                 - pd.to_numeric(group["top1_decomposed_pre"], errors="coerce"))
        if "finetune_epochs_to_target" in group.columns:
            row["n_reached"] = int(group["finetune_epochs_to_target"].notna().sum())
        for metric in METRICS:
            if metric in group.columns:
                mean, ci, _ = mean_ci95(pd.to_numeric(group[metric], errors="coerce").tolist())
                row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean, ci
        if "val_images" in group.columns:
            row["val_images"] = first.get("val_images")
        rows.append(row)
    out = pd.DataFrame(rows)
    return out if (out["n_seeds"] > 1).any() else pd.DataFrame()


#: (mean column base, header) of the replicate table
TABLE: list[tuple[str, str]] = [("top1_decomposed_pre", "top-1 before FT"), ("top1_drop_pre", "drop before FT"),
                                 ("top1_decomposed", "top-1 dec"), ("top1_drop", "top-1 drop"),
                                 ("finetune_epochs_to_target", "FT epochs to target"),
                                 ("finetune_s_to_target", "FT s to target"), ("calibration_s", "calibration s"),
                                 ("decompose_s", "decomposition s"),
                                 ("train_speedup", "train speedup"), ("infer_speedup", "infer speedup"),
                                 ("params_ratio", "params ratio")]


def mean_pm_ci(row: dict, metric: str, digits: int = 2) -> str:
    """``mean +- half-width`` of one metric of an aggregated row ('-' when not measured)."""
    mean, ci = finite_number(row.get(f"{metric}_mean")), finite_number(row.get(f"{metric}_ci95"))
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {ci:.{digits}f}" if ci is not None else "")


def replicates_markdown(agg: pd.DataFrame) -> str:
    """The aggregated rows as Markdown: each metric as mean ± the half-width of its 95 % interval."""
    own = own_overrides(agg)  # only what tells configurations apart and has no column of its own
    agg = agg.assign(overrides=own if own is not None else None)
    ident = [c for c in ("model", "rank_policy", "rank_ratio", "rank_multiple", "freeze") if c in agg]
    ident += ["overrides"] if own is not None else []
    table = [(m, h) for m, h in TABLE if any(finite_number(r.get(f"{m}_mean")) is not None
                                             for r in agg.to_dict("records"))]  # only what was measured
    body = []
    for row in agg.to_dict("records"):
        cells = ["-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                 for v in (row.get(c) for c in ident)]
        cells.append(str(row["n_seeds"]))
        for m, _ in table:
            cell = mean_pm_ci(row, m)
            if m in TO_TARGET and row.get("n_reached") is not None and row["n_reached"] < row["n_seeds"]:
                cell = f"{cell} ({row['n_reached']}/{row['n_seeds']} reached)" if row["n_reached"] else "not reached"
            cells.append(cell)
        body.append([c.replace("|", "\\|") for c in cells])
    headers = [c.replace("_", " ") for c in ident] + ["seeds"] + [h for _, h in table]
    return pd.DataFrame(body, columns=headers).to_markdown(index=False, disable_numparse=True)
