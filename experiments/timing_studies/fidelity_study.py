"""Does the fine-tuning loop run at the benchmark's speed? Repeated default training runs, settings interleaved.

Each run is ``python run.py`` (the default training job; the baseline comes from the cache after the first run)
with a setting's overrides. Per run it reports the loop's images/s, the after-training benchmark and the
loop / bench ratio (``train_ips_fidelity``: two moments of a drifting machine), the benchmark step timed around
each epoch and the paired ratio (``train_ips_fidelity_paired``), and the share of the loop's wall time
between steps. Writes a Markdown table with provenance.

    python experiments/timing_studies/fidelity_study.py --runs 3 --out results/fidelity_cpu/fidelity.md \\
        --setting default= --setting no-progress-bar=trainer.enable_progress_bar=false
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys

import pandas as pd
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/timing_studies/..
KEYS = ["train_ips_logged", "train_ips_decomposed", "train_ips_fidelity", "train_ips_probe",
        "train_ips_fidelity_paired", "train_loop_overhead", "bench_round_spread"]


def _setting(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(
            f"--setting {text!r}: expected NAME=override,override (overrides may be empty)")
    return name, [o for o in overrides.split(",") if o]


def _run(name: str, overrides: list[str], run_dir: str) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a complete result.json would be skipped (resume), not re-measured
    cmd = [sys.executable, "run.py", "logger=csv", *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    path = os.path.join(run_dir, "result.json")
    if proc.returncode != 0 or not os.path.isfile(path):
        raise SystemExit(f"{name}: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    row = json.load(open(path))
    if row.get("status") != "ok":
        raise SystemExit(f"{name}: the job failed: {row.get('error')}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="invocations per setting (interleaved)")
    ap.add_argument("--setting", type=_setting, action="append", default=None,
                    help="NAME=override,override (repeatable; default: one setting with no overrides)")
    ap.add_argument("--runs-dir", default="multirun/fidelity_study")
    ap.add_argument("--out", default=None, help="Markdown file to write (default: print only)")
    args = ap.parse_args()
    settings = args.setting or [("default", [])]
    started = dt.datetime.now(dt.timezone.utc)
    rows = []
    for i in range(1, args.runs + 1):
        for name, overrides in settings:
            r = _run(name, overrides, os.path.join(REPO, args.runs_dir, f"{name}{i}"))
            rows.append({"setting": name, "run": i, **{k: r.get(k) for k in KEYS}, "_row": r})
            print(name, i, *(f"{k}={r.get(k):.3f}" if isinstance(r.get(k), float) else f"{k}=-" for k in KEYS),
                  flush=True)
    df = pd.DataFrame([{k: v for k, v in row.items() if k != "_row"} for row in rows])
    first = rows[0]["_row"]
    lines = [
        "# Fine-tuning loop vs benchmark (fidelity)",
        "",
        f"- command: `python experiments/timing_studies/fidelity_study.py {' '.join(sys.argv[1:])}`",
        f"- date (UTC): {started:%Y-%m-%dT%H:%M:%SZ}",
        f"- commit: {first.get('git_commit')}",
        f"- device: {first.get('device_name')}; torch {torch.__version__}",
        f"- job: model={first.get('model')}, dataset={first.get('dataset')}, batch {first.get('batch_size')}, "
        f"precision {first.get('precision')}, rank.policy={first.get('rank_policy')}, freeze={first.get('freeze')}",
        "- settings: " + "; ".join(f"{n}: `{' '.join(o) or '(defaults)'}`" for n, o in settings),
        "",
        "loop = the Lightning fine-tuning loop's images/s (per-epoch median steps); bench = the side-by-side "
        "benchmark after training; probe = the benchmark step timed around each epoch (paired with it); "
        "between steps = share of the loop's wall time outside the step; drift = the original's drift during the "
        "benchmark.",
        "",
        df.rename(columns={"train_ips_logged": "loop ips", "train_ips_decomposed": "bench ips",
                           "train_ips_fidelity": "loop / bench", "train_ips_probe": "probe ips",
                           "train_ips_fidelity_paired": "loop / probe", "train_loop_overhead": "between steps",
                           "bench_round_spread": "drift"}).to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    for name, _ in settings:
        sub = df[df.setting == name]
        for key, label in (("train_ips_fidelity", "loop / bench"), ("train_ips_fidelity_paired", "loop / probe")):
            vals = [v for v in sub[key] if isinstance(v, float)]
            if vals:
                inside = sum(abs(v - 1) <= 0.10 for v in vals)
                lines.append(f"- {name}: {label} {min(vals):.3f}-{max(vals):.3f} (median "
                             f"{statistics.median(vals):.3f}); {inside}/{len(vals)} within +-10 %")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
