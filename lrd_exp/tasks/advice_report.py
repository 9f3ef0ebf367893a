"""What ``task=advise`` hands the user: the table with its frontier and pick, ``advice.md``, the figure, the command.

The measuring is :mod:`lrd_exp.tasks.advise`'s; this module only turns its rows into the advice.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from typing import Any

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lrd_exp import results
from lrd_exp.config import grid
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.results.pareto import pareto_mask, recommend
from lrd_exp.results.row import STATUS_OK
from lrd_exp.tasks.identity import git_commit, overrides_string
from lrd_exp.tasks.models import config_shape
from lrd_exp.tasks.settings import bench_batch_size, bench_precision

ORIGINAL = "original"
UNCHANGED = "unchanged"  # a configuration that decomposes no layer (it is the original): listed, not timed or ranked
#: advice.csv's columns after the identity and the grid's keys, in order.
COLUMNS = ["configuration", "params_ratio", "flops_ratio", "train_speedup", "infer_speedup",
           "infer_speedup_deployed", "train_mem_mb", "latency_ms", "latency_ms_p90", "approx_error", "agreement",
           "check_kl", "check_error", "top1_pre",
           "layers_decomposed", "layers_merged", "train_ips", "infer_ips_deployed", "frontier", "recommended",
           "status", "error"]
FORMATS = {"params_ratio": "{:.2f}", "flops_ratio": "{:.2f}", "train_speedup": "{:.2f}", "infer_speedup": "{:.2f}",
           "infer_speedup_deployed": "{:.2f}", "train_mem_mb": "{:,.0f}", "latency_ms": "{:.2f}",
           "latency_ms_p90": "{:.2f}", "approx_error": "{:.3f}", "agreement": "{:.3f}", "check_kl": "{:.3g}",
           "check_error": "{:.3f}", "top1_pre": "{:.1f}", "train_ips": "{:,.1f}",
           "infer_ips_deployed": "{:,.1f}"}


def config_label(config: dict[str, Any]) -> str:
    """A configuration's label; an empty grid is the run's own rank and freeze config."""
    return grid.label(config) or "as configured"


def speed_column(cfg: DictConfig) -> str:
    """The frontier's speed axis: training, or inference of the deployed form (the factored one without it)."""
    if _v(cfg.advise.speed) == "train":
        return "train_speedup"
    return "infer_speedup_deployed" if cfg.bench.deploy else "infer_speedup"


def advice_table(cfg: DictConfig, rows: list[dict[str, Any]], reference: dict[str, Any],
                 top1_original: float | None, device_name: str | None = None) -> pd.DataFrame:
    """The configurations and the original (the reference point: speedup 1, error 0), frontier and pick marked."""
    keys = list(grid.axes(cfg.advise.grid))
    base = {"configuration": ORIGINAL, "params_ratio": 1.0, "flops_ratio": 1.0, "train_speedup": 1.0,
            "infer_speedup": 1.0, "infer_speedup_deployed": 1.0 if cfg.bench.deploy else None, "approx_error": 0.0,
            "agreement": 1.0, "check_kl": 0.0, "check_error": 0.0,
            "top1_pre": top1_original, "layers_decomposed": 0, "layers_merged": 0 if cfg.bench.deploy else None,
            "train_ips": reference.get("train_ips"), "infer_ips_deployed": reference.get("infer_ips"),
            "train_mem_mb": reference.get("train_mem_mb"), "latency_ms": reference.get("latency_ms"),
            "latency_ms_p90": reference.get("latency_ms_p90"),
            "status": STATUS_OK, "error": None}  # the reference point; its absolute numbers come from the first timing
    df = pd.DataFrame([base, *rows])
    for col in keys + COLUMNS:
        if col not in df.columns:
            df[col] = None
    for col in keys:  # the values as given (2, not 2.0: the original's empty cell would make the column float)
        df[col] = pd.Series([row.get(col) for row in [base, *rows]], index=df.index, dtype=object)
    df = df[keys + COLUMNS + [c for c in df.columns if c not in keys + COLUMNS]]
    speed = speed_column(cfg)
    numeric = df[[speed, "approx_error"]].apply(pd.to_numeric, errors="coerce").where(df["status"] == STATUS_OK)
    df["frontier"] = pareto_mask(numeric, speed, "approx_error")
    pick = recommend(numeric, speed, "approx_error", max_error=cfg.advise.max_error,
                     candidates=(df["configuration"] != ORIGINAL) & (numeric[speed] > 1.0) & within_check(cfg, df))
    df["recommended"] = df.index == pick if pick is not None else False
    identity = (("model", cfg.model.name), ("dataset", cfg.dataset.name), ("seed", cfg.seed),
                ("device_name", device_name))
    for i, (col, value) in enumerate(identity):
        df.insert(i, col, value)
    return df


def within_check(cfg: DictConfig, df: pd.DataFrame) -> pd.Series:
    """Rows whose top-1 agreement with the original (the training job's end-to-end check) is at least
    ``rank.min_agreement``, or was not measured: only these may be recommended."""
    agreement = pd.to_numeric(df["agreement"], errors="coerce")
    return agreement.isna() | (agreement >= float(cfg.rank.min_agreement))


def collapse_note(cfg: DictConfig, table: pd.DataFrame) -> str | None:
    """One plain line when no measured configuration stays within ``rank.min_agreement``, else None."""
    rows = table[(table["configuration"] != ORIGINAL) & (table["status"] == STATUS_OK)]
    agreement = pd.to_numeric(rows["agreement"], errors="coerce").dropna()
    if agreement.empty or (agreement >= float(cfg.rank.min_agreement)).any():
        return None
    return (f"No configuration in this grid stays within the end-to-end check: every one agrees with the original "
            f"on fewer than {float(cfg.rank.min_agreement):.0%} of predictions (rank.min_agreement; the best: "
            f"{agreement.max():.1%}). They are likely destroyed: try lower ratios, rank.policy=energy, or excluding "
            "the thinnest layers; low-rank decomposition suits layers that are not already thin.")


def recommended_command(cfg: DictConfig, row: pd.Series) -> str:
    """``python run.py task=train <the run's own overrides> <the configuration's keys>``: one training run of what
    was advised, on the same model, data and weights (on synthetic data the advised weights are the model as
    configured, so the baseline is not trained further: ``trainer.baseline_epochs=0``)."""
    config = {k: row[k] for k in grid.axes(cfg.advise.grid)}
    own = ["task=train"]
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        for item in hc.overrides.task:
            key = item.split("=", 1)[0].lstrip("+~")
            if key == "task" or key == "advise" or key.startswith("advise.") or key in config:
                continue
            own.append(item)
        if hc.mode == RunMode.MULTIRUN:  # one job of a sweep: its own choices are in its overrides
            own.append("hydra.mode=RUN")
    if cfg.dataset.name == "synthetic" and cfg.trainer.baseline_epochs != 0:
        own.append("trainer.baseline_epochs=0")
    return " ".join(["python run.py", *map(shlex.quote, own), *map(shlex.quote, grid.overrides(config))])


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown: numbers rounded, missing as '-', the frontier and the pick in words."""
    shown = table.drop(columns=["model", "dataset", "seed", "device_name", "error"]).copy()  # the header says those
    for col, fmt in FORMATS.items():
        shown[col] = [fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"
                      for v in pd.to_numeric(shown[col], errors="coerce")]
    shown["frontier"] = shown["frontier"].map({True: "yes", False: ""})
    shown["recommended"] = shown["recommended"].map({True: "**yes**", False: ""})
    return shown.astype(object).where(shown.notna(), "-").to_markdown(index=False)


def write_advice(cfg: DictConfig, device: DeviceInfo, table: pd.DataFrame, out_dir: str, *,
                 val_images: int | None, notes: list[str], duration_s: float) -> str | None:
    """advice.csv, advice.md and advice_frontier.png; returns the recommended command (None: nothing to train)."""
    from lrd_exp.results.figures import advice_frontier  # matplotlib only when the advice is written

    speed = speed_column(cfg)
    results.write_text_atomic(os.path.join(out_dir, "advice.csv"), table.to_csv(index=False))
    rec = table[table["recommended"]]
    command = recommended_command(cfg, rec.iloc[0]) if len(rec) else None
    batch = bench_batch_size(cfg)
    size = cfg.model.image_size or config_shape(cfg)["image_size"]
    accuracy = (f"top1_pre: top-1 (%) before fine-tuning on the first {val_images} validation images"
                if val_images else "no top-1 (no labelled dataset, or advise.val_images=0)")
    how = (f"the fastest frontier configuration with approx_error <= {cfg.advise.max_error}"
           if cfg.advise.max_error is not None else "the frontier's knee")
    lines = [
        f"# Advice: {cfg.model.name} on {device.name}",
        "",
        f"- command: `{' '.join(['python run.py', overrides_string()]).strip()}`",
        f"- date (UTC): {pd.Timestamp.now(tz='UTC').strftime('%Y-%m-%dT%H:%M:%SZ')}; commit: {git_commit()}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); took {duration_s / 60:.1f} min",
        f"- measured without fine-tuning, side by side with the original: batch {batch}, {bench_precision(cfg)}, "
        f"input {cfg.dataset.in_chans}x{size}x{size}, {cfg.advise.steps} timed steps per model / freeze state; "
        "speedups are ratios of medians (on a noisy host good to about +-15 %)",
        f"- frontier: no other row is both faster ({speed}) and closer to the original (approx_error: the mean "
        f"relative approximation error of the model's weight layers, the accuracy proxy); {accuracy}",
        f"- agreement, check_kl, check_error: the end-to-end check a training job runs right after decomposing (top-1 "
        f"agreement with the original, KL, relative output error on held-out training images); only configurations "
        f"with agreement >= rank.min_agreement={float(cfg.rank.min_agreement):g} may be recommended",
        *[f"- {note}" for note in notes],
        "",
        markdown(table),
        "",
    ]
    note = collapse_note(cfg, table)
    lines += [f"**{note}**", ""] if note else []
    if command:
        r = rec.iloc[0]
        lines += [f"**Recommended: {r['configuration']}** ({speed} {r[speed]:.2f}x, approx_error "
                  f"{r['approx_error']:.3f}: {how}). Train it with:", "", "```", command, "```", ""]
    else:
        lines += [f"**No recommendation**: no frontier configuration is faster than the original here ({how}).", ""]
    results.write_text_atomic(os.path.join(out_dir, "advice.md"), "\n".join(lines))
    advice_frontier(table, os.path.join(out_dir, "advice_frontier.png"), speed=speed)
    return command


def print_advice(cfg: DictConfig, table: pd.DataFrame, command: str | None, out_dir: str) -> None:
    speed = speed_column(cfg)
    cols = {"configuration": "configuration", "params_ratio": "params x", "flops_ratio": "FLOPs x",
            "train_speedup": "train speedup", "infer_speedup": "infer speedup (factored)",
            "infer_speedup_deployed": "infer speedup (deployed)", "train_mem_mb": "train MiB",
            "latency_ms": "latency ms", "approx_error": "approx error", "agreement": "agreement",
            "top1_pre": "top-1 before FT",
            "frontier": "frontier", "status": "status"}
    df = table.sort_values(speed, ascending=False, na_position="last")
    shown = [c for c in cols if c in df.columns and (df[c].notna().any() or c == speed)]
    if "infer_speedup_deployed" in shown and speed != "infer_speedup":
        shown.remove("infer_speedup")  # the deployed form is the one a user keeps
    df = df[shown].copy()
    df["frontier"] = df["frontier"].map({True: "*", False: ""})
    df.loc[table["recommended"], "frontier"] = "* <- recommended"
    print(f"\nAdvice ({cfg.model.name}; speedups vs the original, measured side by side, no fine-tuning):")
    print(df.rename(columns=cols).to_string(index=False, float_format=lambda v: f"{v:,.3f}"))
    note = collapse_note(cfg, table)
    if note:
        print(f"\n{note}")
    if command:
        print(f"\nTrain the recommended configuration:\n  {command}")
    else:
        print("\nNo configuration on the frontier is faster than the original here.")
    print(f"advice: {os.path.join(out_dir, 'advice.md')} (table: advice.csv, figure: advice_frontier.png)")
    sys.stdout.flush()

