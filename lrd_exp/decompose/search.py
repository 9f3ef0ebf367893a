"""``rank.policy=optimized``: pick each layer's rank by timing candidates on the run's own device.

For every decomposable layer, candidate ranks near the estimate and the un-decomposed original are timed at
the layer's real activation shape, batch, memory format and precision (the dtype of a ``*-true`` precision,
autocast for a ``*-mixed`` one) and, with ``compile=True``, compiled, as the run executes it. The estimate is
the ``quantized`` one (at ``rank.multiple``) and always a candidate; the other candidates are spaced by
``rank.step``. A decomposed layer is never slower than its original: only ranks faster than it are options,
and a layer with none stays dense (as does one whose estimate would not shrink it). With ``budget="model"``
(default, ``base=ratio``) the other layers share one parameter budget, the total of their ratio estimates, and
the ranks with the least total time within it win: layers where a rank costs more time per parameter get
compressed more, so the model is faster *at the same compression*. With ``budget="layer"`` each layer takes
its fastest candidate that meets the constraint on its own (compression at least ``ratio``; for
``base=energy`` kept energy at least ``energy``). Candidates within ``tolerance`` of the fastest count as ties
and the largest rank among them is taken (same speed, better accuracy). Timings are cached on disk, keyed by
everything that moves them (device, precision, compile mode, layer geometry, batch, ...), so sweeps and later
runs do not re-measure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from lrd_exp.decompose.layers import SVDConv1x1, SVDLinear, Tucker2Conv
from lrd_exp.devices.allocator import malloc_mode
from lrd_exp.devices.resolve import DeviceInfo, resolve_device
from lrd_exp.results.io import write_json_atomic, write_text_atomic
from lrd_exp.timing.steps import _PRECISIONS, autocast, normalize_precision, time_fn

log = logging.getLogger("lrd_exp")

Timer = Callable[[Any, "tuple[int, ...] | None"], float]


def candidate_ranks(plan: Any, estimate: tuple[int, ...], *, window: float, step: int, base: str,
                    ratio: float, energy_ranks: tuple[int, ...] | None = None,
                    per_layer: bool = True) -> list[tuple[int, ...]]:
    """Ranks to time for one layer: multiples of ``step`` around the estimate that meet the constraint.

    The estimate is always among them when it shrinks the layer: it is what ``quantized`` would take and the
    model-wide budget is counted in it. When it does not, the list may be empty (the layer stays dense).
    ``per_layer=False`` (a model-wide budget) drops the per-layer compression bound: larger ranks than the
    estimate stay candidates, paid for by other layers.
    """
    estimate = tuple(estimate)
    lead = estimate[0]
    lo = max(1, math.floor(lead * (1 - window)))
    hi = max(lo, math.ceil(lead * (1 + window)))
    full = plan.full_ranks
    leads = {r for r in range((lo + step - 1) // step * step, hi + 1, step) if r >= 1} | {lead}
    cands = set()
    for r in sorted(leads):
        if len(estimate) == 1:
            ranks: tuple[int, ...] = (min(r, full[0]),)
        else:  # Tucker-2: scale r2 with r1, quantized to the step
            r2 = max(step, round(estimate[1] * r / max(lead, 1) / step) * step) if r != lead else estimate[1]
            ranks = (min(r, full[0]), min(r2, full[1]))
        cands.add(ranks)
    dense = plan.params_dense
    ok = []
    for ranks in sorted(cands):
        params = plan.params_for(ranks)
        if params >= dense:
            continue
        if ranks == estimate:
            ok.append(ranks)
            continue
        if per_layer and base == "ratio" and params * ratio > dense * (1 + 1e-9):
            continue
        if base == "energy" and energy_ranks is not None and any(r < e for r, e in zip(ranks, energy_ranks)):
            continue
        ok.append(ranks)
    return ok


# ------------------------------------------------------------------------------------------ timing
def _layer_modules(plan: Any, ranks: tuple[int, ...] | None, device: torch.device, channels_last: bool,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    m = copy.deepcopy(plan.module).to(device)
    if ranks is None:
        module = m
    elif isinstance(m, nn.Linear):
        module = SVDLinear.like(m, ranks[0])
    elif plan.kind == "svd":
        module = SVDConv1x1.like(m, ranks[0])
    else:
        module = Tucker2Conv.like(m, ranks[0], ranks[1])
    module = module.to(device=device, dtype=dtype)
    if channels_last and not isinstance(m, nn.Linear):
        module = module.to(memory_format=torch.channels_last)
    return module


def time_layer(plan: Any, ranks: tuple[int, ...] | None, *, batch_size: int, device: DeviceInfo,
               precision: str, objective: str, channels_last: bool = False, warmup: int = 3,
               steps: int = 10, compile: bool = False) -> float:
    """Median seconds of the layer (dense when ``ranks`` is None) at its real activation shape.

    Module and input are cast to the dtype of a ``*-true`` precision (as the timed training step does) and
    run under autocast for a ``*-mixed`` one; ``compile=True`` times ``torch.compile(module)``, the warm-up
    absorbing the compilation. A dtype or op the device lacks raises, naming the layer and precision.
    """
    if plan.in_shape is None:
        raise ValueError(f"layer {plan.name}: no activation shape recorded; pass example_input to decompose_model")
    precision = normalize_precision(precision)
    try:
        return _time_layer(plan, ranks, batch_size=batch_size, device=device, precision=precision,
                           objective=objective, channels_last=channels_last, warmup=warmup, steps=steps,
                           compile=compile)
    except RuntimeError as e:
        raise RuntimeError(f"rank search: timing layer {plan.name} ({type(plan.module).__name__}, ranks "
                           f"{_rank_key(ranks)}) at precision={precision}{', compiled' if compile else ''} on "
                           f"{device.name} failed: {e}") from e


def _time_layer(plan: Any, ranks: tuple[int, ...] | None, *, batch_size: int, device: DeviceInfo,
                precision: str, objective: str, channels_last: bool, warmup: int, steps: int,
                compile: bool) -> float:
    dev = device.torch_device
    dtype = _PRECISIONS[precision][1] or torch.float32
    module = _layer_modules(plan, ranks, dev, channels_last, dtype)
    run = module
    if compile:  # fresh per candidate: as recompiles of one forward they would fall back to eager past dynamo's limit
        torch._dynamo.reset()
        run = torch.compile(module)
    x = torch.randn(batch_size, *plan.in_shape, device=dev, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    total = 0.0
    if objective in ("train", "both"):
        x.requires_grad_(True)

        def train() -> None:
            with autocast(precision, dev.type):
                out = run(x)
            out.float().sum().backward()
            x.grad = None
            for p in module.parameters():
                p.grad = None

        total += time_fn(train, warmup=warmup, steps=steps, sync=device.synchronize).median_s
    if objective in ("inference", "both"):
        xi = x.detach()

        def infer() -> None:
            with torch.inference_mode(), autocast(precision, dev.type):
                run(xi)

        total += time_fn(infer, warmup=warmup, steps=steps, sync=device.synchronize).median_s
    return total


class TimingCache:
    """One JSON file per (device, precision, geometry, batch, objective) key: rank -> median seconds.

    The key also holds what else moves a timing: the dtype and autocast dtype the precision implies, compile
    mode, warm-up and step counts, layout, torch version and the host allocator mode (`device.malloc`: glibc's
    defaults re-fault large CPU buffers every step), so a changed setting re-measures.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(plan: Any, *, device_name: str, precision: str, batch_size: int, objective: str,
            channels_last: bool, compile: bool = False, warmup: int | None = None, steps: int | None = None
            ) -> str:
        m = plan.module
        geometry = {"type": type(m).__name__, "in": plan.n_in, "out": plan.n_out, "in_shape": plan.in_shape,
                    "bias": m.bias is not None}
        if isinstance(m, nn.Conv2d):
            geometry.update(k=m.kernel_size, s=m.stride, p=m.padding, d=m.dilation)
        precision = normalize_precision(precision)
        amp, cast = _PRECISIONS[precision]
        spec = {"device": device_name, "precision": precision, "dtype": str(cast or torch.float32),
                "autocast": str(amp), "compile": bool(compile), "warmup": warmup, "steps": steps,
                "batch": batch_size, "objective": objective, "channels_last": channels_last, "geometry": geometry,
                "torch": torch.__version__, "malloc": malloc_mode()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def _path(self, key: str) -> str | None:
        return os.path.join(self.directory, f"{key}.json") if self.directory else None

    def load(self, key: str) -> dict[str, float]:
        path = self._path(key)
        if not path or not os.path.isfile(path):
            return {}
        try:
            with open(path) as fh:
                return {k: float(v) for k, v in json.load(fh).items()}
        except (OSError, ValueError):
            return {}

    def save(self, key: str, table: dict[str, float]) -> None:
        path = self._path(key)
        if not path:
            return
        os.makedirs(self.directory, exist_ok=True)
        write_json_atomic(path, table)


def _rank_key(ranks: tuple[int, ...] | None) -> str:
    return "original" if ranks is None else "x".join(map(str, ranks))


def faster_than_original(times: dict[tuple[int, ...] | None, float]) -> dict[tuple[int, ...], float]:
    """The ranks that beat the dense layer (``None``): the only ones a layer may take, so none gets slower."""
    dense = times.get(None, math.inf)
    return {r: t for r, t in times.items() if r is not None and t * (1 + 1e-12) < dense}


def pick(times: dict[tuple[int, ...] | None, float], tolerance: float) -> tuple[int, ...] | None:
    """The fastest entry (None = keep the dense layer); decomposed ties within ``tolerance`` go to the largest rank.

    A tie never reaches past the original's time: the tolerance trades speed for accuracy among ranks, not
    against the dense layer.
    """
    options = faster_than_original(times)
    if not options:
        return None
    best = min(options.values())
    ties = [r for r, t in options.items() if t <= best * (1 + tolerance)]
    return max(ties, key=lambda r: (math.prod(r), r))


BUDGET_SLACK = 0.05  # model-wide budget: the chosen ranks keep at least (1 - slack) of the budgeted parameters


def pick_within_budget(times: dict[str, dict[tuple[int, ...] | None, float]],
                       params: dict[str, dict[tuple[int, ...], int]], estimates: dict[str, tuple[int, ...]],
                       tolerance: float, slack: float = BUDGET_SLACK) -> dict[str, tuple[int, ...] | None]:
    """Ranks for all layers at once: the least total time at the estimates' compression.

    Only ranks faster than a layer's original are its options (no layer gets slower); a layer without any
    stays dense and leaves the budget. The others share the budget ``B = sum(params(estimate))`` and must keep
    between ``(1 - slack) B`` and ``B`` parameters: the same compression as the estimates, not more (extra
    compression would buy speed with accuracy). Solved by a Lagrangian relaxation (each layer minimises
    ``time + lam * params``, ``lam`` bisected), so the layers whose parameters cost the most time give them up
    first. The estimates are one feasible answer, an estimate slower than its original replaced by the
    layer's fastest option within its parameters; the result is never slower than that answer by the
    measured per-layer times. Spare budget then goes to ties within ``tolerance`` (the larger rank, same
    speed). ``params`` must hold each estimate's parameter count.
    """
    chosen: dict[str, tuple[int, ...] | None] = {}
    options: dict[str, dict[tuple[int, ...], float]] = {}
    for name, table in times.items():
        opts = faster_than_original(table)
        if opts:
            options[name] = opts
        else:
            chosen[name] = None
    active = list(options)
    if not active:
        return chosen
    missing = [n for n in active if tuple(estimates[n]) not in params[n]]
    if missing:
        raise ValueError(f"no parameter count for the estimate of layer(s) {', '.join(missing)}: "
                         "the estimate must be among the timed candidates")
    budget = sum(params[n][tuple(estimates[n])] for n in active)
    floor = (1.0 - slack) * budget

    def reference(n: str) -> tuple[int, ...]:
        """The estimate, or where it is slower than the original the fastest option within its parameters."""
        est, opts = tuple(estimates[n]), options[n]
        if est in opts:
            return est
        below = [r for r in opts if params[n][r] <= params[n][est]]
        if below:
            return min(below, key=lambda r: (opts[r], -params[n][r]))
        return min(opts, key=lambda r: (params[n][r], opts[r]))

    def solve(lam: float) -> dict[str, tuple[int, ...]]:
        return {n: min(opts, key=lambda r: (opts[r] + lam * params[n][r], -params[n][r]))
                for n, opts in options.items()}

    def total(sel: dict[str, tuple[int, ...]]) -> int:
        return sum(params[n][r] for n, r in sel.items())

    def seconds(sel: dict[str, tuple[int, ...]]) -> float:
        return sum(options[n][r] for n, r in sel.items())

    def boundary(lo: float, hi: float, fits: Callable[[dict[str, tuple[int, ...]]], bool]) -> tuple[float, float]:
        """lam just below and at the smallest lam in [lo, hi] whose solution fits (monotone, true at ``hi``)."""
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if fits(solve(mid)):
                hi = mid
            else:
                lo = mid
        return lo, hi

    scale = max(t / max(params[n][r], 1) for n, opts in options.items() for r, t in opts.items()) or 1.0
    big = scale * 1e6
    reference_sel = {n: reference(n) for n in active}
    sel = solve(0.0)
    if total(sel) > budget:  # the fastest ranks exceed the budget: pay for it where time per parameter is least
        sel = solve(boundary(0.0, big, lambda s: total(s) <= budget)[1])
    elif total(sel) < floor:  # the fastest ranks over-compress: buy parameters back where they cost least time
        most = solve(boundary(-big, 0.0, lambda s: total(s) <= budget)[1])  # as many as fit
        if total(most) >= floor:
            sel = solve(boundary(-big, 0.0, lambda s: total(s) < floor)[0])  # the fewest that reach the floor
            if not floor <= total(sel) <= budget:
                sel = most
        else:
            sel = most
        while total(sel) < floor:  # a discrete gap the relaxation cannot see: cheapest upgrades that fit
            spare = budget - total(sel)
            moves = [((options[n][r] - options[n][sel[n]]) / (params[n][r] - params[n][sel[n]]), n, r)
                     for n in active for r in options[n] if 0 < params[n][r] - params[n][sel[n]] <= spare]
            if not moves:
                break
            _, n, r = min(moves)
            sel[n] = r
    # duality gap of a discrete choice: the reference unless the solution fits and is at least as fast; when
    # neither fits (a slow estimate whose faster ranks are all larger), the one closer to the budget
    fits, ref_fits = total(sel) <= budget, total(reference_sel) <= budget
    if (ref_fits and (not fits or seconds(sel) > seconds(reference_sel))
            or not fits and not ref_fits and total(reference_sel) < total(sel)):
        sel = reference_sel
    spare = budget - total(sel)
    for n in sorted(active, key=lambda n: -params[n][sel[n]]):  # ties: the larger rank if it fits
        t0, p0 = options[n][sel[n]], params[n][sel[n]]
        for r in sorted(options[n], key=lambda r: -params[n][r]):
            extra = params[n][r] - p0
            if 0 < extra <= spare and options[n][r] <= t0 * (1 + tolerance):
                sel[n], spare = r, spare - extra
                break
    chosen.update(sel)
    return chosen


def choose_ranks(plans: Sequence[Any], estimates: dict[str, tuple[int, ...] | None], *, window: float = 0.25,
                 step: int = 8, objective: str = "train", base: str = "ratio",
                 ratio: float = 2.0, energy: float = 0.95, tolerance: float = 0.03, budget: str = "model",
                 batch_size: int = 32,
                 device: DeviceInfo | None = None, precision: str = "32-true", channels_last: bool = False,
                 cache_dir: str | None = None, warmup: int = 3, steps: int = 10, output_dir: str | None = None,
                 timer: Timer | None = None, compile: bool = False
                 ) -> tuple[dict[str, tuple[int, ...] | None], dict[str, str], dict[str, int]]:
    """Per layer: the chosen ranks (None keeps it dense), a reason for the report, and cache statistics.

    ``estimates`` are the ``quantized`` ranks (already at ``rank.multiple``, so there is no ``multiple``
    here); the searched ranks around them are spaced by ``step``. A layer whose estimate would not shrink it
    stays dense untimed. ``timer(plan, ranks_or_None) -> seconds`` replaces the device measurement (tests,
    custom cost models). ``precision`` and ``compile`` time each candidate as the run executes it.
    ``budget="model"`` (with ``base="ratio"``) picks all layers together under the estimates' total parameters
    (:func:`pick_within_budget`); ``"layer"`` picks each layer alone under its own compression bound. Either
    way no layer is given a rank slower than its original.
    """
    model_budget = budget == "model" and base == "ratio"
    device = device or resolve_device("cpu")
    cache = TimingCache(None if timer is not None else cache_dir)
    chosen: dict[str, tuple[int, ...] | None] = {}
    reasons: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    all_times: dict[str, dict[tuple[int, ...] | None, float]] = {}
    prec = normalize_precision(precision)
    for plan in tqdm(plans, desc="rank search", unit="layer", disable=None, leave=False):  # a terminal only
        est = estimates.get(plan.name)
        if est is None:
            chosen[plan.name], reasons[plan.name] = None, "no estimate"
            continue
        if plan.params_for(tuple(est)) >= plan.params_dense:  # quantized would keep it too; nothing to time
            chosen[plan.name] = None
            reasons[plan.name] = f"kept: the estimate {_rank_key(tuple(est))} would not shrink it"
            continue
        energy_ranks = plan.energy_ranks(energy) if base == "energy" else None
        cands = candidate_ranks(plan, est, window=window, step=step, base=base, ratio=ratio,
                                energy_ranks=energy_ranks, per_layer=not model_budget)
        key = TimingCache.key(plan, device_name=device.name, precision=prec, batch_size=batch_size,
                              objective=objective, channels_last=channels_last, compile=compile, warmup=warmup,
                              steps=steps)
        table = cache.load(key)
        times: dict[tuple[int, ...] | None, float] = {}
        for ranks in [None, *cands]:
            k = _rank_key(ranks)
            if k in table:
                cache.hits += 1
            else:
                cache.misses += 1
                table[k] = (timer(plan, ranks) if timer is not None else
                            time_layer(plan, ranks, batch_size=batch_size, device=device, precision=prec,
                                       objective=objective, channels_last=channels_last, warmup=warmup,
                                       steps=steps, compile=compile))
            times[ranks] = table[k]
        cache.save(key, table)
        all_times[plan.name] = times
    if model_budget:
        chosen.update(pick_within_budget(
            all_times, {p.name: {r: p.params_for(r) for r in all_times[p.name] if r is not None}
                        for p in plans if p.name in all_times},
            {n: tuple(estimates[n]) for n in all_times}, tolerance))
    else:
        chosen.update({n: pick(t, tolerance) for n, t in all_times.items()})
    how = "optimized (model-wide budget)" if model_budget else "optimized"
    for plan in plans:
        if plan.name not in all_times:
            continue
        times, est, choice = all_times[plan.name], estimates[plan.name], chosen[plan.name]
        t_dense = times[None]
        if choice is None:
            reasons[plan.name] = (f"kept: the original ({t_dense * 1e3:.3f} ms) was faster than every candidate "
                                  f"(best {min(v for r, v in times.items() if r is not None) * 1e3:.3f} ms)")
        else:
            reasons[plan.name] = (f"{how}: {_rank_key(choice)} {times[choice] * 1e3:.3f} ms vs original "
                                  f"{t_dense * 1e3:.3f} ms, estimate {_rank_key(est)} "
                                  f"{times.get(tuple(est), math.nan) * 1e3:.3f} ms")
        for ranks, t in times.items():
            rows.append({"layer": plan.name, "rank": -1 if ranks is None else ranks[0],
                         "rank_out": -1 if ranks is None else ranks[-1], "time_ms": t * 1e3,
                         "objective": objective, "device_name": device.name, "chosen": ranks == choice,
                         "estimate": ranks == tuple(est)})
    log.info("rank search: %d timings measured, %d from cache", cache.misses, cache.hits)
    if output_dir and rows:
        write_text_atomic(os.path.join(output_dir, "rank_timings.csv"), pd.DataFrame(rows).to_csv(index=False))
    return chosen, reasons, {"timings_measured": cache.misses, "timings_cached": cache.hits}
