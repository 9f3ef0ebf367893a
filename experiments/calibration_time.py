"""Time a calibrated decomposition against the weight-only one, side by side in one process.

    python experiments/calibration_time.py --model resnet50 --image-size 224 --images 256 --out results/calibration_cpu

Random weights and N(0, 1) images (nothing is downloaded): the timing depends on the shapes, not on the values.
Writes ``<model>_time.md`` with the device, date and commit.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import subprocess
import time

import timm
import torch

from lrd_exp import decompose_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--calibrate", default="independent")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=1000).eval()
    images = torch.randn(args.images, 3, args.image_size, args.image_size)
    rows = []
    for fit, kw in (("weights", {"fit": "weights", "recalibrate_bn": False}),
                    ("weights + BN re-estimation", {"fit": "weights", "calibration": images.split(args.batch)}),
                    ("activations", {"fit": "activations", "calibrate": args.calibrate,
                                     "calibration": images.split(args.batch)})):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = decompose_model(m, policy="quantized", ratio=args.ratio, multiple=8,
                                 calibration_images=args.images, **kw)
        total = time.perf_counter() - t0
        rows.append((fit, total, report.calibration_s, report.approx_error, len(report.decomposed)))
        print(f"{fit}: {total:.1f} s (calibration passes {report.calibration_s:.1f} s)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"# Calibrated decomposition time: {args.model}, {args.image_size} px, {args.images} images",
             "",
             f"Command: `python experiments/calibration_time.py --model {args.model} --image-size {args.image_size} "
             f"--images {args.images} --batch {args.batch} --ratio {args.ratio} --calibrate {args.calibrate}"
             + (f" --threads {args.threads}" if args.threads else "") + "`",
             f"Device: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"date {datetime.date.today()}; commit {commit}.",
             "Random weights and N(0, 1) images: the time depends on shapes only. policy=quantized, multiple 8.",
             "",
             "| fit | decomposition s | of it, calibration passes s | layers decomposed |",
             "|---|---:|---:|---:|"]
    lines += [f"| {fit} | {total:.1f} | {cal:.1f} | {n} |" for fit, total, cal, _, n in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"{args.model}_time.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
