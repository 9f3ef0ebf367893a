"""Regenerate the paper figures from sweep dirs and/or CSV files.

    python experiments/paper_figures.py multirun/2026-01-01/10-00-00 [more sweeps or CSVs] --out results/figures

Inputs: a sweep dir means its ``results.csv`` (or its ``result.json`` files when the table is missing), plus
every ``curves.csv`` and ``rank_timings.csv`` below it. A CSV file is recognised by its columns: a results
table, a labelled curves table (variant, epoch, val_top1; a ``freeze`` column dashes the variants that do
not freeze), one job's ``curves.csv`` or a rank timings table.
Writes throughput_vs_accuracy.png, speedup_bars.png, convergence.png, rank_saw_tooth.png (each skipped with
a message when its data is absent: the ``lrd_exp`` logger's, printed here). Exits 1 when no figure could be drawn.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402

try:
    from lrd_exp.results import figures as F  # noqa: E402
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lrd_exp.results import figures as F  # noqa: E402
from lrd_exp.results.replicates import replicated  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="sweep dirs and/or CSV files")
    p.add_argument("--out", default="results/figures", help="output folder for the PNGs (default: %(default)s)")
    p.add_argument("--layer", default=None, help="layer for the rank saw-tooth (default: the most measured one)")
    p.add_argument("--stage", default="fine",
                   help="curves.csv rows whose stage contains this are plotted (default: %(default)s)")
    return p.parse_args(argv)


def load_inputs(inputs: list[str], stage: str | None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(results, curves, timings) frames from every input; missing inputs are reported, not fatal."""
    results, curves, timings, dirs = [], [], [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            dirs.append(path)
            results.append(F.load_results(path))
        elif path.is_file():
            df = pd.read_csv(path)
            kind = F.classify_csv(df)
            if kind == "timings":
                timings.append(df)
            elif kind == "curves":
                curves.append(df)
            elif kind == "job_curves":
                curves.append(F.label_job_curves(df, F.job_row(path), stage))
            else:
                results.append(df)
        else:
            print(f"[figures] input not found: {item}")
    if dirs:
        curves.append(F.load_curves(dirs, stage))
        timings.append(F.load_timings(dirs))

    def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frames = [f for f in frames if f is not None and not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return cat(results), cat(curves), cat(timings)


def show_skipped() -> None:
    """Print the ``lrd_exp`` logger's notes (why a figure was skipped) with this script's own output."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[figures] %(message)s"))
    logger = logging.getLogger("lrd_exp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    show_skipped()
    out = Path(args.out)
    results, curves, timings = load_inputs(args.inputs, args.stage)
    # seed sweeps get their own figures (against compression); the per-variant figures show the single runs
    single = results[~replicated(results)] if not results.empty else results
    if single.empty:
        single = results
    written = [
        F.throughput_vs_accuracy(single, out / "throughput_vs_accuracy.png"),
        F.speedup_bars(single, out / "speedup_bars.png"),
        F.convergence(curves, out / "convergence.png"),
        F.rank_saw_tooth(timings, out / "rank_saw_tooth.png", layer=args.layer),
        F.versus_compression(results, out / "accuracy_drop_vs_compression.png", "top1_drop",
                             "top-1 drop against the same seed's original (points)", baseline=0.0),
        F.versus_compression(results, out / "train_speedup_vs_compression.png", "train_speedup",
                             "training speedup (decomposed / original)", baseline=1.0),
    ]
    written = [p for p in written if p is not None]
    for p in written:
        print(f"[figures] wrote {p}")
    if not written:
        print("[figures] no figure drawn: no usable input")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
