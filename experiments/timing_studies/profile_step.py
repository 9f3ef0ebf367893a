"""Where does a training step's time go, original against decomposed? (torch.profiler, CPU op self-times)

Splits one training step into convolution / matmul forward, their backward, and everything else (BatchNorm,
activations, adds, optimizer, allocator), and prints the bound that the "everything else" part puts on the
training speedup: LRD shrinks only the first two. Run it on an idle machine; it times a few steps per model.

    python experiments/timing_studies/profile_step.py --model resnet50 --size 128 --batch 16 --channels-last \
        > results/benchmark_cpu/resnet50/step_profile.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import platform

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from lrd_exp.decompose import decompose_model
from lrd_exp.devices import cpu_name
from lrd_exp.devices.allocator import tune_malloc
from lrd_exp.tasks.identity import git_commit
from lrd_exp.timing.steps import prepare_train_step

FORWARD = {"aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::_convolution", "aten::mm",
           "aten::addmm", "aten::bmm", "aten::linear", "aten::_slow_conv2d_forward"}
BACKWARD = {"aten::convolution_backward", "aten::mkldnn_convolution_backward", "aten::_slow_conv2d_backward",
            "aten::cudnn_convolution_backward"}


def split(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, channels_last: bool
) -> dict[str, float]:
    """Seconds per step by part (profiler self-time; mm/addmm of backward count as forward-type GEMMs)."""
    step = prepare_train_step(model, x, y, channels_last=channels_last).fn  # the benchmark's own step
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    parts = {"conv/GEMM forward": 0.0, "conv backward": 0.0, "everything else": 0.0}
    for ev in prof.key_averages():
        sec = ev.self_cpu_time_total / 1e6 / steps
        key = "conv/GEMM forward" if ev.key in FORWARD else "conv backward" if ev.key in BACKWARD else "everything else"
        parts[key] += sec
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--policy", default="quantized")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    tune_malloc("tuned")
    torch.manual_seed(0)
    original = timm.create_model(args.model, num_classes=args.classes)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch,))
    decomposed = copy.deepcopy(original)
    decompose_model(decomposed, policy=args.policy, ratio=args.ratio, example_input=x[:1])
    o = split(original, x, y, args.steps, args.channels_last)
    d = split(decomposed, x, y, args.steps, args.channels_last)
    commit = git_commit()
    print(f"# Training-step profile: {args.model}, batch {args.batch}, {args.size} px, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {args.policy} LRD ratio {args.ratio:g}\n")
    print(f"- command: `python experiments/timing_studies/profile_step.py {' '.join(_argv(args))}`")
    print(f"- date (UTC): {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; commit: {commit}; "
          f"device: {cpu_name()} ({torch.get_num_threads()} threads); torch {torch.__version__}; "
          f"python {platform.python_version()}")
    print("- profiler self-time per step (ms), median-free: a sum over "
          f"{args.steps} profiled steps after 3 warm-up steps, so it carries the machine's drift\n")
    print("| part | original (ms) | decomposed (ms) | speedup |\n|---|---:|---:|---:|")
    for key in o:
        ratio = f"{o[key] / d[key]:.2f}x" if d[key] > 0 else "-"
        print(f"| {key} | {1000 * o[key]:.0f} | {1000 * d[key]:.0f} | {ratio} |")
    to, td = sum(o.values()), sum(d.values())
    print(f"| **step** | {1000 * to:.0f} | {1000 * td:.0f} | {to / td:.2f}x |")
    rest = o["everything else"]
    conv = to - rest
    print(f"\n\"Everything else\" is {rest / to:.0%} of the original step and LRD shrinks it only "
          f"{rest / d['everything else']:.2f}x. Taking it as fixed: even if the "
          f"decomposed convolutions had no cost at all, the step could be at most {to / rest:.1f}x faster; at a "
          f"conv speedup of 2x it would be {to / (rest + conv / 2):.2f}x, at 3x {to / (rest + conv / 3):.2f}x.")


def _argv(args: argparse.Namespace) -> list[str]:
    out = [f"--model {args.model}", f"--size {args.size}", f"--batch {args.batch}", f"--classes {args.classes}",
           f"--ratio {args.ratio:g}",
           f"--policy {args.policy}", f"--steps {args.steps}"]
    return out + (["--channels-last"] if args.channels_last else [])


if __name__ == "__main__":
    main()
