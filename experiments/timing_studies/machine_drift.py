"""How much does this machine's speed drift on its own? A fixed workload (one model, one batch, the same
training step) timed back to back for ``--seconds``; medians of consecutive blocks of ``--block`` steps.

The spread of those block medians is the floor for run-to-run agreement of *absolute* images/s: no
benchmark statistic can repeat tighter than the machine does. Ratios measured interleaved are not bound by it.

    python experiments/timing_studies/machine_drift.py --seconds 60 > results/benchmark_cpu/machine_drift.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from lrd_exp.devices.allocator import MALLOC_MODES, tune_malloc
from lrd_exp.timing.steps import make_train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--malloc", default="tuned", choices=MALLOC_MODES, help="as device.malloc")
    args = ap.parse_args()
    malloc = tune_malloc(args.malloc)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, in_chans=1)
    x, y = torch.randn(args.batch, 1, args.size, args.size), torch.randint(0, 10, (args.batch,))
    step = make_train_step(model, x, y)
    for _ in range(5):
        step()
    times: list[float] = []
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    blocks = [statistics.median(times[i:i + args.block]) for i in range(0, len(times) - args.block + 1, args.block)]
    mid = statistics.median(blocks)
    print(f"Fixed workload: {args.model} training step, batch {args.batch}, {args.size} px, "
          f"{torch.get_num_threads()} threads, malloc {malloc}, {len(times)} steps in {args.seconds:.0f} s.\n")
    print("| block | median step (ms) | images/s |\n|---:|---:|---:|")
    for i, b in enumerate(blocks):
        print(f"| {i} | {1000 * b:.1f} | {args.batch / b:.0f} |")
    print(f"\nBlock medians range {1000 * min(blocks):.1f}-{1000 * max(blocks):.1f} ms: "
          f"(max-min)/median = {(max(blocks) - min(blocks)) / mid:.1%} with nothing else changing.")


if __name__ == "__main__":
    main()
