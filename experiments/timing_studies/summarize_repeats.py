"""Run-to-run spread of repeated benchmark invocations (result.json files in, a Markdown table out).

    python experiments/timing_studies/summarize_repeats.py results/benchmark_cpu/default_run*.json
"""

from __future__ import annotations

import json
import sys

import pandas as pd

KEYS = ["train_ips_original", "train_ips_decomposed", "train_speedup", "infer_ips_original",
        "infer_ips_decomposed", "infer_speedup"]


def main(paths: list[str]) -> None:
    rows = [json.load(open(p)) for p in paths]
    df = pd.DataFrame([{k: r.get(k) for k in KEYS} for r in rows], index=[f"run {i + 1}" for i in range(len(rows))])
    # best-step ratios (fastest step of each, i.e. the least disturbed one): a check beside the medians
    for kind in ("train", "infer"):
        df[f"{kind}_speedup_best"] = [r.get(f"{kind}_ips_decomposed_max", float("nan")) /
                                      r.get(f"{kind}_ips_original_max", float("nan")) for r in rows]
    spread = (df.max() - df.min()) / df.median()
    out = pd.concat([df, df.median().to_frame("median").T, spread.to_frame("(max-min)/median").T])
    print(f"Repeated `task=benchmark` invocations of the default config ({rows[0].get('model')}, batch "
          f"{rows[0].get('batch_size')}, {rows[0].get('device_name')}).\n")
    print(out.to_markdown(floatfmt=".3f"))
    ratios = spread[["train_speedup", "infer_speedup"]].max()
    best = spread[["train_speedup_best", "infer_speedup_best"]].max()
    absolute = spread.drop(["train_speedup", "infer_speedup", "train_speedup_best", "infer_speedup_best"]).max()
    print(f"\nLargest run-to-run spread of the measured speedups: {ratios:.1%} "
          f"({'within' if ratios <= 0.10 else 'outside'} the 10 % target).")
    print(f"Best-step speedups (each model's fastest step; not the reported statistic) spread by {best:.1%}.")
    print(f"Largest run-to-run spread of absolute images/s: {absolute:.1%} "
          f"({'within' if absolute <= 0.10 else 'outside'} 10 %; absolute speed also moves with the machine itself, "
          "see machine_drift.md).")


if __name__ == "__main__":
    main(sys.argv[1:])
