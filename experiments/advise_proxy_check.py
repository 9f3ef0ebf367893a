"""Does task=advise's accuracy proxy rank configurations the way fine-tuning does? (results/advise_digits/)

Joins the advice of ``experiment=advise_digits`` (approximation error and top-1 before fine-tuning, per
architecture, compression and seed) with ``experiment=digits_compression``'s measured top-1 after fine-tuning, and
writes Spearman rank correlations. The proxy is an error, so a useful one correlates *negatively* with top-1.

    python experiments/advise_proxy_check.py <advise sweep dir> results/digits_compression/results.csv \
        --out results/advise_digits

The calibrated decomposition (rank.fit=activations: the proxy is then the output error on the calibration images)
against experiment=digits_calibration's rows of the same fit:

    python experiments/advise_proxy_check.py <advise sweep dir> results/digits_calibration/results.csv \
        --rank fit=activations --rank recalibrate_bn=true --name calibrated --out results/advise_digits
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr


def load_advice(sweep_dir: Path) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in sorted(sweep_dir.rglob("advice.csv"))]
    if not frames:
        raise SystemExit(f"no advice.csv under {sweep_dir}: run `python run.py experiment=advise_digits` first")
    df = pd.concat(frames, ignore_index=True)
    df = df[(df["configuration"] != "original") & (df["status"] == "ok")]
    return df.rename(columns={"rank.ratio": "rank_ratio"})[
        ["model", "seed", "rank_ratio", "approx_error", "top1_pre", "params_ratio"]]


def load_finetuned(results_csv: Path, rank: dict[str, str] | None = None) -> pd.DataFrame:
    """The sweep's quantized rows; ``rank`` keeps those whose rank node has these values (as text)."""
    df = pd.read_csv(results_csv)
    df = df[(df["status"] == "ok") & (df["rank_policy"] == "quantized")]
    for key, value in (rank or {}).items():
        params = df["rank_params"].map(json.loads)
        df = df[params.map(lambda p, k=key: str(p.get(k)).lower()) == value.lower()]
    return df[["model", "seed", "rank_ratio", "freeze", "top1_decomposed", "top1_decomposed_pre"]]


def rho(a: pd.Series, b: pd.Series) -> str:
    r, p = spearmanr(a, b)
    return f"{r:+.2f} (p={p:.2g}, n={len(a)})"


def check(advice: pd.DataFrame, tuned: pd.DataFrame, source: str = "experiment=digits_compression, 3 epochs, "
          "mean over its no / sequential / alternating freeze schedules") -> str:
    # top-1 after fine-tuning, averaged over the freeze schedules, per (model, ratio, seed)
    per_seed = tuned.groupby(["model", "rank_ratio", "seed"], as_index=False).agg(
        top1=("top1_decomposed", "mean"), top1_pre_sweep=("top1_decomposed_pre", "first"))
    joined = advice.merge(per_seed, on=["model", "rank_ratio", "seed"], how="inner")
    if joined.empty:
        raise SystemExit("the advice and the sweep share no (model, rank_ratio, seed): were they run on the same grid?")
    means = joined.groupby(["model", "rank_ratio"], as_index=False).mean(numeric_only=True)
    lines = ["# The accuracy proxy against top-1 after fine-tuning (digits)", "",
             "Proxy: `approx_error`, the mean relative approximation error per layer of the decomposed model before "
             f"fine-tuning (task=advise). Truth: top-1 after fine-tuning ({source}). Spearman rho; a useful proxy is "
             "negative (more error, less accuracy).", ""]
    lines += ["| scope | points | rho(proxy, top-1 after FT) | rho(compression ratio, top-1 after FT) | "
              "rho(proxy, top-1 before FT) |", "|:--|:--|--:|--:|--:|"]
    scopes = [(m, joined[joined["model"] == m], means[means["model"] == m]) for m in sorted(joined["model"].unique())]
    if joined["model"].nunique() > 1:
        scopes.append(("all architectures pooled", joined, means))
    for name, points, avg in scopes:
        for label, data in (("(ratio, seed)", points), ("ratio means", avg)):
            lines.append(f"| {name} | {label} | {rho(data['approx_error'], data['top1'])} | "
                         f"{rho(data['rank_ratio'], data['top1'])} | {rho(data['approx_error'], data['top1_pre'])} |")
    agree = (joined["top1_pre"] - joined["top1_pre_sweep"]).abs()
    lines += ["", "Per configuration (means over seeds):", "",
              means[["model", "rank_ratio", "params_ratio", "approx_error", "top1_pre", "top1_pre_sweep", "top1"]]
              .rename(columns={"top1_pre": "top-1 before FT (advise)", "top1_pre_sweep": "top-1 before FT (sweep)",
                               "top1": "top-1 after FT (sweep)"}).to_markdown(index=False, floatfmt=".3f"), "",
              f"Consistency: advise's top-1 before fine-tuning against the sweep's own (same split, baseline and "
              f"seed): largest difference {agree.max():.2f} points over {len(joined)} configurations "
              f"({(agree < 1e-6).sum()} identical).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("advise_dir", type=Path)
    ap.add_argument("results_csv", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rank", action="append", default=[], metavar="KEY=VALUE",
                    help="keep the sweep's rows whose rank node has this value (repeatable)")
    ap.add_argument("--name", default="", help="suffix of the written files: proxy_check_<name>.md")
    args = ap.parse_args()
    rank = dict(item.split("=", 1) for item in args.rank)
    advice, tuned = load_advice(args.advise_dir), load_finetuned(args.results_csv, rank)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.name}" if args.name else ""
    advice.to_csv(args.out / f"advice_all{suffix}.csv", index=False)
    source = (f"{args.results_csv}, rows with " + ", ".join(f"rank.{k}={v}" for k, v in rank.items())) if rank else \
        "experiment=digits_compression, 3 epochs, mean over its no / sequential / alternating freeze schedules"
    text = check(advice, tuned, source)
    (args.out / f"proxy_check{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
