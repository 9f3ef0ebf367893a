"""What finding every layer's damage (rank.allocation) costs on a larger model: measured cuts estimated from a few,
the fisher estimate (``rank.damage_by=fisher``) timed whole.

    python experiments/allocation_cost_estimate.py --model resnet50 --size 224 --images 128 --cuts 4
    python experiments/allocation_cost_estimate.py --model resnet50 --size 224 --images 128 --damage-by fisher

Builds the timm model (random weights: the cost does not depend on them), lists the candidate layers and their
candidate ranks as ``rank.allocation`` would (rank.multiple 8), fits them to 64 random calibration images, and times
``--cuts`` real cuts spread over the layers (each: the fitted replacement and one forward of ``--images`` images
with it, as :func:`lrd_exp.decompose.damage.measured_damage` does). The estimate is the number of cuts times
the mean measured cut, in process CPU seconds and wall seconds. An estimate, not a full run: say so beside it.
``--damage-by fisher`` instead fits every layer and runs the whole fisher pass over all candidates (a full run, no
cache), and splits its time into building the candidates (the fits) and the passes.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import timm
import torch

from lrd_exp.decompose import calibration as C
from lrd_exp.decompose.allocation import allocation_candidates
from lrd_exp.decompose.damage import layer_damage
from lrd_exp.decompose.surgery import build_factorized, find_candidates


def fit_moments(model: torch.nn.Module, plans: list, calib: torch.Tensor) -> None:
    """The plans' calibration moments and whitened spectra, as the decomposition computes them before allocating."""
    moments, _ = C.collect_moments(model, {p.name: p.module for p in plans}, [calib], seed=0)
    for p in plans:
        p.moments = moments[p.name]
        p.energy_spectra()


def fisher_cost(model: torch.nn.Module, plans: list, cands: dict, calib: torch.Tensor, damage_in: list) -> str:
    """Every layer fitted, every candidate's damage estimated: wall and CPU seconds, the fits' share apart."""
    t0, c0 = time.perf_counter(), time.process_time()
    fit_moments(model, plans, calib)
    prep_wall, prep_cpu = time.perf_counter() - t0, time.process_time() - c0
    spent = [0.0, 0.0]

    def build(plan, ranks):
        w, c = time.perf_counter(), time.process_time()
        out = build_factorized(plan, ranks, error=False)
        spent[0] += time.perf_counter() - w
        spent[1] += time.process_time() - c
        return out

    t0, c0 = time.perf_counter(), time.process_time()
    _, stats = layer_damage(model, plans, cands, damage_in, build, method="fisher")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return (f"fisher, all {stats['damage_measured']} cuts: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (of which "
            f"fitting the candidates {spent[0] / 60:.1f} min wall, {spent[1] / 60:.1f} min CPU); before it, the "
            f"moments and whitened spectra (the decomposition computes them anyway) {prep_wall / 60:.1f} min wall, "
            f"{prep_cpu / 60:.1f} min CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--cuts", type=int, default=4)
    ap.add_argument("--damage-by", choices=("measured", "fisher"), default="measured")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(64, 3, args.size, args.size)
    plans, _ = find_candidates(model)
    cands = {p.name: allocation_candidates(p, 8) for p in plans}
    total = sum(len(c) for c in cands.values())
    if args.damage_by == "fisher":
        damage_in = list(torch.randn(args.images, 3, args.size, args.size).split(64))
        print(f"{args.model} {args.size}px, {args.images} damage images, threads {torch.get_num_threads()}: "
              f"{len(plans)} layers, {total} candidate cuts; " + fisher_cost(model, plans, cands, x, damage_in))
        return
    step = max(1, len(plans) // args.cuts)
    picked = plans[::step][:args.cuts]
    fit_moments(model, picked, x)
    sample = {p.name: [cands[p.name][len(cands[p.name]) // 2]] for p in picked}
    damage_in = list(torch.randn(args.images, 3, args.size, args.size).split(64))
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for b in damage_in:  # the reference forward measured_damage runs once
            model(b)
    fwd_wall, fwd_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    _, stats = layer_damage(model, picked, sample, damage_in, partial(build_factorized, error=False))
    wall, cpu = time.perf_counter() - t0 - fwd_wall, time.process_time() - c0 - fwd_cpu
    per_wall, per_cpu = wall / len(picked), cpu / len(picked)
    print(f"{args.model} {args.size}px, {args.images} damage images, threads {torch.get_num_threads()}: "
          f"{len(plans)} layers, {total} candidate cuts; measured {len(picked)} cuts "
          f"({', '.join(f'{n} {sample[n][0]}' for n in sample)}): {per_wall:.2f} s wall, {per_cpu:.2f} s CPU each "
          f"(one forward {fwd_wall:.2f} s wall) -> estimate for all: {(fwd_wall + total * per_wall) / 60:.1f} min "
          f"wall, {(fwd_cpu + total * per_cpu) / 60:.1f} min CPU ({stats['damage_measured']} cuts measured)")


if __name__ == "__main__":
    main()
