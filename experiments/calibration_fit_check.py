"""Which activation fit keeps the most accuracy before fine-tuning: independent or sequential calibration?

    python experiments/calibration_fit_check.py --cache <paths.cache_dir of experiment=digits_calibration> \
        --out results/digits_calibration/calibrate_check.md

For each architecture and seed of experiment=digits_calibration (the same split and cached baselines), decomposes
the baseline at compression 2, 4 and 8 (quantized, multiple 8) fitted to the layers' outputs, with
``rank.calibrate=independent`` and ``sequential`` (and BatchNorm re-estimation, the default), and measures top-1 on
the whole held-out half before any fine-tuning, and the decomposition time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import subprocess
import time
from pathlib import Path

import pandas as pd
import torch
from hydra import compose, initialize_config_dir

from lrd_exp import decompose_model
from lrd_exp.cli import prepare
from lrd_exp.devices.resolve import resolve_device
from lrd_exp.tasks.models import baseline
from lrd_exp.training.data import build_datamodule

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str]):
    """The job's config exactly as run.py composes it (without the hydra node)."""
    prepare()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(128), y.split(128))) \
            / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--archs", default="resnet18,vit_tiny_digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="2,4,8")
    args = ap.parse_args()
    device = resolve_device("cpu")
    rows = []
    for arch in args.archs.split(","):
        for seed in map(int, args.seeds.split(",")):
            cfg = compose_config(["experiment=digits_calibration", f"arch={arch}", f"seed={seed}",
                                  f"paths.cache_dir={args.cache}", "logger.wandb.enabled=false"])
            dm = build_datamodule(cfg.dataset, batch_size=cfg.trainer.batch_size, seed=seed,
                                  data_dir=cfg.paths.data_dir)
            dm.setup("fit")
            original, _, cache = baseline(cfg, device, dm, "/tmp")
            if not cache["baseline_cache_hit"]:
                print(f"note: {arch} seed {seed}: the baseline was not in the cache and was trained here")
            xv, yv = dm.val_dataset.tensors
            calibration = dm.calibration_batches(cfg.rank.calibration_images, cfg.trainer.batch_size)
            ref = top1(original, xv, yv)
            for ratio in map(float, args.ratios.split(",")):
                for calibrate in ("independent", "sequential"):
                    model = copy.deepcopy(original)
                    t0 = time.perf_counter()
                    decompose_model(model, policy="quantized", ratio=ratio, multiple=8, calibration=calibration,
                                    calibrate=calibrate, seed=seed)
                    rows.append({"model": arch, "seed": seed, "ratio": ratio, "calibrate": calibrate,
                                 "top1_original": ref, "top1_pre": top1(model, xv, yv),
                                 "decompose_s": time.perf_counter() - t0})
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df["drop_pre"] = df["top1_original"] - df["top1_pre"]
    summary = df.groupby(["model", "ratio", "calibrate"], as_index=False).agg(
        seeds=("seed", "nunique"), drop_pre=("drop_pre", "mean"), drop_pre_max=("drop_pre", "max"),
        decompose_s=("decompose_s", "mean"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Independent against sequential calibration: top-1 drop before fine-tuning (digits)", "",
             f"Command: `python experiments/calibration_fit_check.py --cache {args.cache} --out {args.out}`; "
             f"device {device.name}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"{datetime.date.today()}; commit {commit}.",
             "Baselines and split of experiment=digits_calibration (899 validation images: one image = 0.11 "
             "points); quantized ranks at multiple 8, fitted to 256 training images, BatchNorm re-estimated.", "",
             summary.to_markdown(index=False, floatfmt=".2f"), "", "Every decomposition:", "",
             df.to_markdown(index=False, floatfmt=".2f"), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
