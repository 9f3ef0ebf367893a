"""One budget for the whole model (rank.allocation) against the uniform ratio, on three digits models.

    python experiments/allocation_check.py --cache <paths.cache_dir> --rows results/allocation_digits/rows.jsonl
    python experiments/allocation_check.py --cache <...> --rows <...> --report results/allocation_digits/results.md

For resnet18 and the digits ViT (experiment=digits_calibration's split and cached baselines) and the
``nn.TransformerEncoder`` classifier of experiments/attention_fit_check.py, per seed and compression 2 / 4 / 8:
the quantized ranks (multiple 8) fitted to 256 training images, spread uniformly (the paper) or by
``rank.allocation=global`` at equal parameters; top-1 on the held-out half before fine-tuning, the end-to-end
check's KL on 256 further training images (the measured damage), and the predicted (summed per-layer) damage.
``--fastest model:ratio`` adds ``rank.allocation=fastest`` (the fastest ranks by measured layer times whose
predicted damage stays within the uniform ranks'), ``--budgets flops,time`` adds ``global`` under those budgets
(rows ``global/flops``, ``global/time``), and ``--speed model:ratio`` times a training step and the
deployed inference of the original, uniform and allocated models side by side (batch 64, interleaved rounds).
Rows are appended to ``--rows`` (JSON lines) as they finish (a rerun skips those present); ``--report`` writes
the tables.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from lrd_exp import decompose_model
from lrd_exp.deploy.merge import merge_for_inference
from lrd_exp.devices.resolve import resolve_device
from lrd_exp.results.replicates import mean_ci95
from lrd_exp.timing.steps import time_fn

MODELS = ("resnet18", "vit_tiny_digits", "encoder")
KEYS = ["model", "seed", "ratio", "allocation"]


def load(arch: str, seed: int, cache: str) -> dict:
    """The trained original, 256 calibration images, 256 check images, the held-out half, and a timing batch."""
    if arch == "encoder":
        from experiments.attention_fit_check import DigitsTransformer, digits, train

        x_train, y_train, x_val, y_val = digits(seed)
        torch.manual_seed(seed)
        model = DigitsTransformer()
        train(model, x_train, y_train, 30, seed)
        calib = list(x_train[:256].split(64))
        check = list(x_train[256:512].split(64))
        return dict(model=model.eval(), calibration=calib, check=check, x_val=x_val, y_val=y_val,
                    x=x_train[:64], y=y_train[:64])
    from experiments.calibration_fit_check import compose_config
    from lrd_exp.tasks.models import baseline
    from lrd_exp.training.data import build_datamodule

    cfg = compose_config(["experiment=digits_calibration", f"arch={arch}", f"seed={seed}",
                          f"paths.cache_dir={cache}", "logger.wandb.enabled=false"])
    dm = build_datamodule(cfg.dataset, batch_size=cfg.trainer.batch_size, seed=seed, data_dir=cfg.paths.data_dir)
    dm.setup("fit")
    model, _, hit = baseline(cfg, resolve_device("cpu"), dm, "/tmp")
    if not hit["baseline_cache_hit"]:
        print(f"note: {arch} seed {seed}: the baseline was trained here", flush=True)
    calib = dm.calibration_batches(256, 64)
    check = dm.held_out_batches(256, 256, 64)
    x_val, y_val = dm.val_dataset.tensors
    return dict(model=model.eval(), calibration=calib, check=check, x_val=x_val, y_val=y_val, x=x_val[:64],
                y=y_val[:64])


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(128), y.split(128)))
    return 100.0 * hits / len(y)


def decompose(data: dict, ratio: float, allocation: str, seed: int, cache: str, max_damage: float | None = None,
              damage_by: str = "measured", budget_by: str = "params") -> tuple[nn.Module, dict]:
    model = copy.deepcopy(data["model"])
    context = {"damage_cache_dir": os.path.join(cache, "rank_damage"), "cache_dir": os.path.join(cache, "rank_timings"),
               "batch_size": 64, "device": resolve_device("cpu"), "warmup": 2, "steps": 7}
    t0 = time.perf_counter()
    report = decompose_model(model, policy="quantized", ratio=ratio, multiple=8, calibration=data["calibration"],
                             evaluation=data["check"], allocation=allocation, seed=seed, rank_search=context,
                             max_damage=max_damage, damage_by=damage_by, budget_by=budget_by)
    a = report.allocation or {}
    return model, {"params_ratio": report.params_before / report.params_after,
                   "check_kl": report.check.kl, "check_agreement": report.check.agreement,
                   "predicted_damage": a.get("predicted_damage"), "uniform_predicted_damage":
                   a.get("uniform_predicted_damage"), "damage_s": a.get("damage_s"),
                   "damage_cpu_s": a.get("damage_cpu_s"),
                   "damage_measured": a.get("damage_measured"), "damage_cached": a.get("damage_cached"),
                   "layers_dense": sum(lay.action == "kept" and lay.damage is not None for lay in report.layers),
                   "decompose_s": time.perf_counter() - t0}


def speeds(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int = 8) -> dict[str, dict]:
    """Median seconds of a training step (forward, loss, backward) and of the deployed inference, per model,
    interleaved over ``rounds`` rounds of 3 steps each (after 3 warm-up steps)."""
    sync = lambda: None  # noqa: E731 - the CPU has nothing queued
    models = {n: copy.deepcopy(m) for n, m in models.items()}  # train-mode steps move BatchNorm's statistics
    deployed = {}
    for name, m in models.items():
        d = copy.deepcopy(m).eval()
        if name != "original":
            merge_for_inference(d, x[:1], warmup=2, steps=5)
        deployed[name] = d

    def train_step(m: nn.Module):
        def run():
            nn.functional.cross_entropy(m(x), y).backward()
            for p in m.parameters():
                p.grad = None
        return run

    def infer(m: nn.Module):
        def run():
            with torch.inference_mode():
                m(x)
        return run

    out: dict[str, dict] = {n: {"train": [], "infer": []} for n in models}
    for n, m in models.items():
        m.train()
        time_fn(train_step(m), warmup=3, steps=1, sync=sync)
        time_fn(infer(deployed[n]), warmup=3, steps=1, sync=sync)
    for _ in range(rounds):
        for n, m in models.items():
            out[n]["train"] += time_fn(train_step(m), warmup=0, steps=3, sync=sync).times_s
            out[n]["infer"] += time_fn(infer(deployed[n]), warmup=0, steps=3, sync=sync).times_s
    return {n: {k: float(torch.tensor(v).median()) for k, v in t.items()} for n, t in out.items()}


def pairs(text: str) -> set[tuple[str, float]]:
    return {(p.split(":")[0], float(p.split(":")[1])) for p in text.split(",") if p}


def load_rows(paths: list[Path]) -> pd.DataFrame:
    """Rows from JSON-lines files, or from run logs (each row printed as a dict, then one line of speedups per
    ratio that was timed: ``{'uniform': (train, deployed), ...}``); a later row of the same key wins."""
    rows: list[dict] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("{\"") or line.startswith("{'model'"):
                rows.append(json.loads(line) if line.startswith("{\"") else ast.literal_eval(line))
            elif line.startswith("{'uniform'"):
                for allocation, (train_x, deployed_x) in ast.literal_eval(line).items():
                    row = next(r for r in reversed(rows) if r["allocation"] == allocation)
                    row.update(train_speedup=train_x, deployed_speedup=deployed_x)
    df = pd.DataFrame(rows, columns=KEYS if not rows else None)
    return df.drop_duplicates(KEYS, keep="last") if len(df) else df


def run(args: argparse.Namespace) -> None:
    done = load_rows([args.rows])
    have = {tuple(r) for r in done[KEYS].astype(str).itertuples(index=False)}
    fastest, speed = pairs(args.fastest), pairs(args.speed)
    for arch in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            data = None
            for ratio in map(float, args.ratios.split(",")):
                scales = [float(x) for x in args.fastest_scales.split(",")] if (arch, ratio) in fastest else []
                allocations = ["uniform", "global"] + [f"global/{b}" for b in args.budgets.split(",") if b]
                allocations += [f"fastest@{x:g}" if x != 1 else "fastest" for x in scales]
                if all((arch, str(seed), str(ratio), a) in have for a in allocations):
                    continue
                data = data or load(arch, seed, args.cache)
                ref = top1(data["model"], data["x_val"], data["y_val"])
                models, rows = {"original": data["model"]}, []
                for allocation in allocations:  # fastest@s: within s x the uniform ranks' predicted damage
                    bound = None
                    if "@" in allocation:
                        bound = float(allocation.split("@")[1]) * rows[1]["uniform_predicted_damage"]
                    kind, _, budget_by = allocation.split("@")[0].partition("/")  # global/flops: budget_by=flops
                    model, info = decompose(data, ratio, kind, seed, args.cache, bound, budget_by=budget_by or "params")
                    models[allocation] = model
                    rows.append({"model": arch, "seed": seed, "ratio": ratio, "allocation": allocation,
                                 "top1_original": ref, "top1_pre": top1(model, data["x_val"], data["y_val"]), **info})
                    print(rows[-1], flush=True)
                if (arch, ratio) in speed:
                    timed = speeds(models, data["x"], data["y"])
                    for row in rows:
                        t, o = timed[row["allocation"]], timed["original"]
                        row.update(train_speedup=o["train"] / t["train"], deployed_speedup=o["infer"] / t["infer"])
                    print({r["allocation"]: (r["train_speedup"], r["deployed_speedup"]) for r in rows}, flush=True)
                with args.rows.open("a") as fh:
                    fh.writelines(json.dumps(row) + "\n" for row in rows)


def ci(values: pd.Series) -> str:
    mean, half, n = mean_ci95(pd.to_numeric(values, errors="coerce").dropna().tolist())
    if mean is None:
        return ""
    return f"{mean:.3g}" if half is None else f"{mean:.3g} ± {half:.2g}"


def report(args: argparse.Namespace) -> None:
    df = load_rows([args.rows, *args.logs])
    df["drop_pre"] = df["top1_original"] - df["top1_pre"]
    metrics = ["drop_pre", "check_kl", "predicted_damage", "params_ratio", "train_speedup", "deployed_speedup"]
    metrics = [m for m in metrics if m in df]
    table = (df.groupby(["model", "ratio", "allocation"])
             .apply(lambda g: pd.Series({"seeds": g["seed"].nunique(), **{m: ci(g[m]) for m in metrics}}),
                    include_groups=False).reset_index())
    measured = df[pd.to_numeric(df["damage_measured"], errors="coerce") > 0]  # the first global run of a seed
    cost = (measured.groupby("model").agg(seeds=("seed", "nunique"), cuts=("damage_measured", "mean"),
                                          damage_wall_s=("damage_s", "mean"), damage_cpu_s=("damage_cpu_s", "mean"))
            .reset_index())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Global rank allocation against the uniform ratio (digits, before fine-tuning)", "",
             f"Command: `python experiments/allocation_check.py --cache {args.cache} --rows {args.rows}"
             f"{' --logs ' + ' '.join(map(str, args.logs)) if args.logs else ''} --report {args.report}` (the runs: "
             f"PROVENANCE.md); torch {torch.__version__}, {datetime.date.today()}, report from commit {commit}.", "",
             "Mean ± 95 % CI over seeds (t). drop_pre: top-1 points lost on the held-out half before fine-tuning; "
             "check_kl: the end-to-end check's KL (measured damage) on 256 training images the fit did not use; "
             "predicted_damage: the sum of the layers' measured damages (global / fastest); speedups: the "
             "original's median step time over the model's (train: forward + backward, batch 64; deployed: "
             "inference after merge_for_inference).", "",
             table.to_markdown(index=False), "",
             "What measuring the layers' damage cost (the first global run of each seed; later ratios read the "
             "cache): cuts (layer x candidate rank, 128 images each), mean wall and process CPU seconds.", "",
             cost.to_markdown(index=False, floatfmt=".1f"), "", "Every run:", "",
             df.to_markdown(index=False, floatfmt=".4g"), ""]
    args.report.write_text("\n".join(lines))
    print(table.to_markdown(index=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--rows", type=Path, required=True)
    ap.add_argument("--report", type=Path, help="write the tables here (from --rows and --logs)")
    ap.add_argument("--logs", type=Path, nargs="*", default=[], help="run logs whose printed rows count too")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--fastest", default="resnet18:4", help="model:ratio pairs that also run allocation=fastest")
    ap.add_argument("--speed", default="resnet18:4", help="model:ratio pairs whose speed is measured")
    ap.add_argument("--budgets", default="", help="more rank.budget_by values for global (each a row: global/<by>)")
    ap.add_argument("--fastest-scales", default="1", help="fastest's damage bounds, as multiples of the uniform "
                    "ranks' predicted damage (each a row: fastest@<scale>; 1: fastest)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.report:
        report(args)
    else:
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()
