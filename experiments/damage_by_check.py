"""Does the fisher estimate of each layer's damage (``rank.damage_by=fisher``) track the measured damage?

    python experiments/damage_by_check.py --cache <paths.cache_dir> --rows results/allocation_digits/damage_by.jsonl
    python experiments/damage_by_check.py --cache <...> --rows <...> --report results/allocation_digits/damage_by.md

On experiments/allocation_check.py's three digits models, seeds and ratios (2 / 4 / 8, multiple 8, 256 calibration
images): every (layer, candidate rank) damage both ways on the same 128 damage images (Spearman rho over the
pairs, and within each layer), what each way cost (wall and process CPU seconds, no cache), and the allocation
each gives: ``rank.allocation=global`` at equal parameters with measured or fisher damages, beside the uniform
ranks, top-1 on the held-out half before fine-tuning and the end-to-end check's KL (measured on 256 further
images). Rows are appended to ``--rows`` as they finish (a rerun skips those present).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import spearmanr

from experiments.allocation_check import MODELS, ci, decompose, load, top1
from lrd_exp.decompose import allocation as A
from lrd_exp.decompose.damage import layer_damage, rank_key

RUNS = (("uniform", "measured"), ("global", "measured"), ("global", "fisher"))


class BothWays:
    """Stands in for ``allocation.layer_damage``: finds the damages both ways once per ratio (timed; from the cache
    unless ``fresh``), keeps both tables, and returns the asked one."""

    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh
        self.tables: dict[str, dict] = {}
        self.cost: dict[str, tuple[float, float, int]] = {}

    def __call__(self, model, plans, candidates, batches, build, *, method, cache_dir=None, **kw):
        for way in ("measured", "fisher"):
            if way in self.tables:
                continue
            cached = None if self.fresh else cache_dir
            t0, c0 = time.perf_counter(), time.process_time()
            self.tables[way], stats = layer_damage(model, plans, candidates, batches, build, method=way,
                                                   cache_dir=cached, **kw)
            self.cost[way] = (time.perf_counter() - t0, time.process_time() - c0, stats["damage_measured"])
        return self.tables[method], {"damage_by": method, "damage_measured": self.cost[method][2],
                                     "damage_cached": 0, "damage_s": self.cost[method][0],
                                     "damage_cpu_s": self.cost[method][1]}

    def pairs(self) -> pd.DataFrame:
        m, f = self.tables["measured"], self.tables["fisher"]
        return pd.DataFrame([{"layer": n, "ranks": rank_key(r), "measured": m[n][r], "fisher": f[n][r]}
                             for n in m for r in m[n] if r is not None])


def agreement(pairs: pd.DataFrame) -> dict[str, float]:
    """Spearman rho over every (layer, rank) pair, and the mean of the within-layer rhos (layers with 3+ ranks)."""
    within = [spearmanr(g["measured"], g["fisher"]).statistic for _, g in pairs.groupby("layer") if len(g) >= 3]
    within = [w for w in within if w == w]
    return {"rho_all": float(spearmanr(pairs["measured"], pairs["fisher"]).statistic),
            "rho_within_layer": float(sum(within) / len(within)) if within else float("nan"), "pairs": len(pairs)}


def run(args: argparse.Namespace) -> None:
    done = pd.read_json(args.rows, lines=True) if args.rows.exists() else pd.DataFrame(columns=["model", "seed"])
    have = set(zip(done["model"], done["seed"]))
    for arch in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            if (arch, seed) in have:
                continue
            data = load(arch, seed, args.cache)
            ref = top1(data["model"], data["x_val"], data["y_val"])
            rows = []
            for ratio in map(float, args.ratios.split(",")):
                both = BothWays(fresh=ratio == args.fresh_ratio)
                A.layer_damage, original = both, A.layer_damage
                try:
                    for allocation, damage_by in RUNS:
                        model, info = decompose(data, ratio, allocation, seed, args.cache, damage_by=damage_by)
                        rows.append({"model": arch, "seed": seed, "ratio": ratio, "allocation": allocation,
                                     "damage_by": damage_by, "top1_original": ref,
                                     "top1_pre": top1(model, data["x_val"], data["y_val"]), **info})
                finally:
                    A.layer_damage = original
                cost = {f"{w}_{k}": v for w, c in both.cost.items() for k, v in zip(("s", "cpu_s", "cuts"), c)}
                cost["measured_fresh"] = ratio == args.fresh_ratio
                rows.append({"model": arch, "seed": seed, "ratio": ratio, "allocation": "damage tables",
                             **agreement(both.pairs()), **cost})
                print(rows[-1], flush=True)
            with args.rows.open("a") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in rows)


def report(args: argparse.Namespace) -> None:
    df = pd.read_json(args.rows, lines=True)
    runs = df[df["allocation"] != "damage tables"].copy()
    runs["drop_pre"] = runs["top1_original"] - runs["top1_pre"]
    runs["run"] = runs["allocation"] + " / " + runs["damage_by"]
    table = (runs.groupby(["model", "ratio", "run"])
             .apply(lambda g: pd.Series({"seeds": g["seed"].nunique(), "drop_pre": ci(g["drop_pre"]),
                                         "check_kl": ci(g["check_kl"]), "params_ratio": ci(g["params_ratio"])}),
                    include_groups=False).reset_index())
    tabs = df[df["allocation"] == "damage tables"].copy()
    tabs["measured_fresh"] = tabs["measured_fresh"].fillna(0).astype(bool)
    agree = (tabs.groupby("model")
             .apply(lambda g: pd.Series({"runs": len(g), "pairs": ci(g["pairs"]), "rho_all": ci(g["rho_all"]),
                                         "rho_within_layer": ci(g["rho_within_layer"]),
                                         "measured_s": ci(g[g["measured_fresh"]]["measured_s"]),
                                         "measured_cpu_s": ci(g[g["measured_fresh"]]["measured_cpu_s"]),
                                         "fisher_s": ci(g[g["measured_fresh"]]["fisher_s"]),
                                         "fisher_cpu_s": ci(g[g["measured_fresh"]]["fisher_cpu_s"])}),
                    include_groups=False).reset_index())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Measured against fisher-estimated layer damage (digits, before fine-tuning)", "",
             f"Command: `python experiments/damage_by_check.py --cache {args.cache} --rows {args.rows} --models "
             f"{args.models} --seeds {args.seeds} --ratios {args.ratios}` then `--report {args.report}`; torch "
             f"{torch.__version__}, {torch.get_num_threads()} thread, CPU ({args.device}), {datetime.date.today()}, "
             f"report from commit {commit}.", "",
             "Mean ± 95 % CI over seeds x ratios (t). Damage tables: every (layer, candidate rank) damage found both "
             "ways on the same 128 calibration images, without a cache; rho_all: Spearman over all pairs; "
             "rho_within_layer: mean Spearman within a layer (its candidate ranks); seconds: wall and process CPU "
             f"for all of a ratio's cuts, found anew without a cache at ratio {args.fresh_ratio:g} (the other "
             "ratios read the cache; "
             "the candidate sets differ a little between ratios: the uniform ranks are candidates).", "",
             agree.to_markdown(index=False), "",
             "Allocations: drop_pre, top-1 points lost on the held-out half before fine-tuning; check_kl, the "
             "end-to-end check's KL on 256 training images the fit did not use.", "",
             table.to_markdown(index=False), ""]
    args.report.write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--rows", type=Path, required=True)
    ap.add_argument("--report", type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--fresh-ratio", type=float, default=4.0, help="the ratio whose measured damages are found "
                    "anew (timed); at the others they may come from the cache")
    ap.add_argument("--device", default="2-core AMD EPYC", help="the machine's name, for the report")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.report:
        report(args)
    else:
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()
