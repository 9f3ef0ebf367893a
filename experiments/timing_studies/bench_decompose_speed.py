"""How long decompose_model takes (issue target: <= 5 s for resnet50 and vit_base_patch16_224 on 2 CPU cores).

    python experiments/timing_studies/bench_decompose_speed.py [--models resnet50 vit_base_patch16_224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from lrd_exp import decompose_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    ap.add_argument("--policy", default="ratio")
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        times = []
        for _ in range(args.repeat):
            model = timm.create_model(name, pretrained=False)
            t0 = time.perf_counter()
            report = decompose_model(model, policy=args.policy, ratio=args.ratio)
            times.append(time.perf_counter() - t0)
        print(f"{name}: median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}) "
              f"over {args.repeat}; {report.summary()}")


if __name__ == "__main__":
    main()
