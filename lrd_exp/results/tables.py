"""Sweep tables: ``results.csv`` (every column) and ``results.md`` (a readable subset, provenance and legend)."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from lrd_exp.results.atomic import write_text_atomic
from lrd_exp.results.files import MARKDOWN_FILENAME, REPLICATES_FILENAME, TABLE_FILENAME
from lrd_exp.results.replicates import aggregate_replicates, replicates_markdown
from lrd_exp.results.row import STATUS_OK, UNSTABLE_ROUND_SPREAD, finite_number, is_missing, own_overrides

# (column, header, kind) of the readable Markdown subset
MARKDOWN_COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "text"),
    ("variant", "variant", "text"),
    ("rank_policy", "rank policy", "text"),
    ("rank_ratio", "ratio", "g"),
    ("rank_multiple", "multiple", "int"),
    ("freeze", "freeze", "text"),
    ("device", "device", "text"),
    ("params_ratio", "params ratio", "x"),
    ("train_ips_original", "train ips orig", "ips"),
    ("train_ips_decomposed", "train ips dec", "ips"),
    ("train_speedup", "train speedup", "x"),
    ("infer_ips_original", "infer ips orig", "ips"),
    ("infer_ips_decomposed", "infer ips dec", "ips"),
    ("infer_speedup", "infer speedup", "x"),
    ("infer_speedup_deployed", "infer speedup deployed", "x"),
    ("latency_ms_original", "latency ms orig", "ms"),
    ("latency_ms_decomposed", "latency ms dec", "ms"),
    ("latency_ms_deployed", "latency ms deployed", "ms"),
    ("train_mem_mb_original", "train MiB orig", "mib"),
    ("train_mem_mb_decomposed", "train MiB dec", "mib"),
    ("flops_speedup_train", "FLOP-pred train", "x"),
    ("flops_speedup_infer", "FLOP-pred infer", "x"),
    ("train_ips_fidelity", "loop / bench", "x"),
    ("train_ips_fidelity_paired", "loop / probe", "x"),
    ("bench_round_spread", "drift", "share"),
    ("top1_original", "top-1 orig", "pct"),
    ("top1_decomposed", "top-1 dec", "pct"),
    ("top1_drop", "top-1 drop", "drop"),
    ("status", "status", "status"),
]

# columns newer than many committed tables: shown only when some row has them
SHOWN_WHEN_MEASURED = {"infer_speedup_deployed", "latency_ms_original", "latency_ms_decomposed", "latency_ms_deployed",
                       "train_mem_mb_original", "train_mem_mb_decomposed"}

MARKDOWN_LEGEND = (
    "_Legend: ips = images/s (median of timed steps); speedup = decomposed / original images/s (>1 = faster); "
    "FLOP-pred = FLOP-predicted speedup (original / decomposed FLOPs); params ratio = original / decomposed; "
    "loop / bench = images/s of the real fine-tuning loop / benchmark images/s (1.00 = no hidden bottleneck); "
    "loop / probe = the same, against the benchmark step timed around each of the loop's epochs (paired in "
    "time, so the machine's drift cancels); "
    "drift = how much the original's training step moved during the benchmark (max-min of the medians of "
    f"consecutive blocks of steps / their median: the machine's own drift; above {UNSTABLE_ROUND_SPREAD:.0%} the "
    "speedups are less certain); "
    "deployed = every decomposed layer in its faster form for inference (factored or merged into one dense "
    "layer); latency = inference of one image, median ms; train MiB = memory of one training step (allocator "
    "peak on CUDA / NPU, counted on the CPU: parameters, gradients, optimizer state, saved activations), the "
    "decomposed model's largest freeze state; "
    "top-1 in %, drop = original - fine-tuned decomposed (points); overrides (when shown) = the job's own "
    "command-line overrides, those not every row shares; '-' = not measured._"
)


def _fmt(value: Any, kind: str, row: Mapping[str, Any] | None = None) -> str:
    if kind == "status":
        if is_missing(value):
            return "-"
        err = None if row is None else row.get("error")
        if value != STATUS_OK and isinstance(err, str) and err:
            short = " ".join(err.split())[:40]
            return f"{value}: {short}"
        return str(value)
    if kind == "text":
        return "-" if is_missing(value) else str(value)
    num = finite_number(value)
    if num is None:
        return "-" if is_missing(value) else str(value)
    if kind == "int":
        return f"{int(round(num))}"
    if kind == "g":
        return f"{num:.4g}"
    if kind == "x":
        return f"{num:.2f}"
    if kind == "ips":
        return f"{num:,.0f}" if abs(num) >= 100 else f"{num:.1f}"
    if kind == "pct":
        return f"{num:.2f}"
    if kind == "ms":
        return f"{num:.2f}"
    if kind == "mib":
        return f"{num:,.0f}" if abs(num) >= 100 else f"{num:.1f}"
    if kind == "share":
        return f"{num:.0%}"
    if kind == "drop":
        return f"{num:+.2f}"
    return f"{num:.4g}"


def _unique_text(series: pd.Series | None) -> list[str]:
    if series is None:
        return []
    out: list[str] = []
    for v in series.tolist():
        if not is_missing(v) and str(v) not in out:
            out.append(str(v))
    return out


def provenance_line(df: pd.DataFrame) -> str:
    """Device names, run dates and git commits of the rows: every committed table says where it came from."""
    devices = _unique_text(df.get("device_name")) or _unique_text(df.get("device")) or ["unknown"]
    dates = sorted({t[:10] for t in _unique_text(df.get("time"))})
    date_txt = (dates[0] if len(dates) == 1 else f"{dates[0]} .. {dates[-1]}") if dates else "unknown"
    commits = [c[:10] for c in _unique_text(df.get("git_commit"))] or ["unknown"]
    status = df["status"] if "status" in df.columns else pd.Series(dtype=object)
    n_ok = int((status == STATUS_OK).sum())
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"_Provenance: device(s): {', '.join(devices)}; run date(s): {date_txt}; "
        f"git commit(s): {', '.join(commits)}; rows: {len(df)} ({n_ok} ok); generated {now}._"
    )


def markdown_table(df: pd.DataFrame) -> str:
    """The readable subset of a sweep table as GitHub Markdown (numbers rounded, missing shown as '-')."""
    cols = [(c, h, k) for c, h, k in MARKDOWN_COLUMNS
            if c in df.columns and (c not in SHOWN_WHEN_MEASURED or df[c].notna().any())]
    own = own_overrides(df)
    if own is not None:
        df = df.assign(_own_overrides=[o or None for o in own])
        at = next((i + 1 for i, (c, _, _) in enumerate(cols) if c == "variant"), 0)
        cols.insert(at, ("_own_overrides", "overrides", "text"))
    records = df.to_dict("records")
    body = pd.DataFrame(
        [[_fmt(r.get(c), k, r) for c, _, k in cols] for r in records],
        columns=[h for _, h, _ in cols],
    )
    align = ["left" if k in ("text", "status") else "right" for _, _, k in cols]
    body = body.map(lambda v: v.replace("|", "\\|"))  # a '|' in a cell (error text) would split the column
    return body.to_markdown(index=False, disable_numparse=True, colalign=align)


def resolution_line(df: pd.DataFrame) -> str | None:
    """What one validation image is worth in points, so a reader knows which differences a table can resolve."""
    counts = sorted({int(v) for v in pd.to_numeric(df.get("val_images", pd.Series(dtype=float)), errors="coerce")
                     .dropna()})
    if not counts:
        return None
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    worth = f"{100 / counts[-1]:.2f}" + ("" if len(counts) == 1 else f"-{100 / counts[0]:.2f}")
    return (f"_Resolution: every top-1 rests on {n} validation images, so one image is worth {worth} points; a "
            "difference smaller than that, or inside the 95 % intervals, does not tell variants apart._")


def write_tables(df: pd.DataFrame, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``results.csv`` (every column) and ``results.md`` (readable subset + provenance) atomically; a sweep
    over ``seed`` also gets ``replicates.csv`` and a table of means with their 95 % intervals."""
    out_dir = Path(out_dir)
    csv_path = write_text_atomic(out_dir / TABLE_FILENAME, df.to_csv(index=False))
    parts = [f"# Results: {out_dir.resolve().name}", provenance_line(df)]
    agg = aggregate_replicates(df)
    if not agg.empty:
        write_text_atomic(out_dir / REPLICATES_FILENAME, agg.to_csv(index=False))
        parts += ["## Mean ± 95 % confidence interval over seeds (Student t)", replicates_markdown(agg),
                  "## Every job"]
    parts += [markdown_table(df), MARKDOWN_LEGEND]
    resolution = resolution_line(df)
    if resolution:
        parts.append(resolution)
    md = "\n\n".join(parts)
    md_path = write_text_atomic(out_dir / MARKDOWN_FILENAME, md + "\n")
    return csv_path, md_path
