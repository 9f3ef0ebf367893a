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
import csv
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from lrd_exp.config.values import canonical_precision
from lrd_exp.decompose.cache import TableCache
from lrd_exp.decompose.layers import SVDConv1x1, SVDLinear, Tucker2Conv
from lrd_exp.decompose.plan import LayerPlan
from lrd_exp.decompose.registry import is_linear, layer_bias
from lrd_exp.devices.allocator import malloc_mode
from lrd_exp.devices.resolve import DeviceInfo, resolve_device
from lrd_exp.results.atomic import write_text_atomic
from lrd_exp.timing.steps import autocast, cast_dtype, precision_dtypes, time_fn

log = logging.getLogger("lrd_exp")

Timer = Callable[[LayerPlan, "tuple[int, ...] | None"], float]


def candidate_ranks(plan: LayerPlan, estimate: tuple[int, ...], *, window: float, step: int, base: str,
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
def _layer_modules(plan: LayerPlan, ranks: tuple[int, ...] | None, device: torch.device, channels_last: bool,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    m = copy.deepcopy(plan.module).to(device)
    if ranks is None:
        module = m
    elif is_linear(m):
        module = SVDLinear.like(m, ranks[0])
    elif plan.kind == "svd":
        module = SVDConv1x1.like(m, ranks[0])
    else:
        module = Tucker2Conv.like(m, ranks[0], ranks[1])
    module = module.to(device=device, dtype=dtype)
    if channels_last and not is_linear(m):
        module = module.to(memory_format=torch.channels_last)
    return module


def time_layer(plan: LayerPlan, ranks: tuple[int, ...] | None, *, batch_size: int, device: DeviceInfo,
               precision: str, objective: str, channels_last: bool = False, warmup: int = 3,
               steps: int = 10, compile: bool = False) -> float:
    """Median seconds of the layer (dense when ``ranks`` is None) at its real activation shape.

    Module and input are cast to the dtype of a ``*-true`` precision (as the timed training step does) and
    run under autocast for a ``*-mixed`` one; ``compile=True`` times ``torch.compile(module)``, the warm-up
    absorbing the compilation. A dtype or op the device lacks raises, naming the layer and precision.
    """
    if plan.in_shape is None:
        raise ValueError(f"layer {plan.name}: no activation shape recorded; pass example_input to decompose_model")
    precision = canonical_precision(precision)
    try:
        return _time_layer(plan, ranks, batch_size=batch_size, device=device, precision=precision,
                           objective=objective, channels_last=channels_last, warmup=warmup, steps=steps,
                           compile=compile)
    except RuntimeError as e:
        raise RuntimeError(f"rank search: timing layer {plan.name} ({type(plan.module).__name__}, ranks "
                           f"{_rank_key(ranks)}) at precision={precision}{', compiled' if compile else ''} on "
                           f"{device.name} failed: {e}") from e


def _time_layer(plan: LayerPlan, ranks: tuple[int, ...] | None, *, batch_size: int, device: DeviceInfo,
                precision: str, objective: str, channels_last: bool, warmup: int, steps: int,
                compile: bool) -> float:
    dev = device.torch_device
    dtype = cast_dtype(precision) or torch.float32
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


class TimingCache(TableCache):
    """One JSON file per (device, precision, geometry, batch, objective) key: rank -> median seconds.

    The key also holds what else moves a timing: the dtype and autocast dtype the precision implies, compile
    mode, warm-up and step counts, layout, torch version and the host allocator mode (`device.malloc`: glibc's
    defaults re-fault large CPU buffers every step), so a changed setting re-measures.
    """

    @staticmethod
    def key(plan: LayerPlan, *, device_name: str, precision: str, batch_size: int, objective: str,
            channels_last: bool, compile: bool = False, warmup: int | None = None, steps: int | None = None
            ) -> str:
        m = plan.module
        geometry = {"type": type(m).__name__, "in": plan.n_in, "out": plan.n_out, "in_shape": plan.in_shape,
                    "bias": layer_bias(m) is not None}
        if isinstance(m, nn.Conv2d):
            geometry.update(k=m.kernel_size, s=m.stride, p=m.padding, d=m.dilation)
        precision = canonical_precision(precision)
        amp, cast = precision_dtypes(precision)
        spec = {"device": device_name, "precision": precision, "dtype": str(cast or torch.float32),
                "autocast": str(amp), "compile": bool(compile), "warmup": warmup, "steps": steps,
                "batch": batch_size, "objective": objective, "channels_last": channels_last, "geometry": geometry,
                "torch": torch.__version__, "malloc": malloc_mode()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


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

Choice = dict[str, tuple[int, ...]]  # layer -> ranks


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
    if not options:
        return chosen
    problem = BudgetProblem(options, params, estimates, slack)
    sel = problem.no_slower_than_reference(problem.relaxed())
    chosen.update(problem.spend_on_ties(sel, tolerance))
    return chosen


class BudgetProblem:
    """A multiple-choice knapsack over layers: per layer its options (choice -> the cost minimised) and what each
    spends of one shared budget (``params``), by default the estimates' total.

    :func:`pick_within_budget` minimises seconds under parameters; :mod:`lrd_exp.decompose.allocation` minimises
    measured damage under parameters, FLOPs or seconds, or seconds under damage. A choice is a ranks tuple, or None
    where keeping the layer dense is an option."""

    def __init__(self, options: dict[str, dict[Any, float]], params: dict[str, dict[Any, float]],
                 estimates: dict[str, Any], slack: float, budget: float | None = None) -> None:
        self.options, self.params = options, params
        self.estimates = {n: None if estimates[n] is None else tuple(estimates[n]) for n in options}
        missing = [n for n, est in self.estimates.items() if est not in params[n]]
        if missing:
            raise ValueError(f"no parameter count for the estimate of layer(s) {', '.join(missing)}: "
                             "the estimate must be among the timed candidates")
        self.budget = sum(params[n][est] for n, est in self.estimates.items()) if budget is None else budget
        self.floor = (1.0 - slack) * self.budget
        spent = [c for n in options for c in params[n].values() if c > 0]
        scale = max(abs(t) for opts in options.values() for t in opts.values()) / min(spent, default=1.0)
        self.big = (scale or 1.0) * 1e6  # a multiplier past every layer's cost per unit of budget

    def total(self, sel: Choice) -> int:
        return sum(self.params[n][r] for n, r in sel.items())

    def seconds(self, sel: Choice) -> float:
        return sum(self.options[n][r] for n, r in sel.items())

    def solve(self, lam: float) -> Choice:
        """Each layer's option minimising ``time + lam * params`` (ties: the larger)."""
        return {n: min(opts, key=lambda r: (opts[r] + lam * self.params[n][r], -self.params[n][r]))
                for n, opts in self.options.items()}

    def boundary(self, lo: float, hi: float, fits: Callable[[Choice], bool]) -> tuple[float, float]:
        """lam just below and at the smallest lam in [lo, hi] whose solution fits (monotone, true at ``hi``)."""
        for _ in range(200):
            mid = (lo + hi) / 2
            if mid in (lo, hi):
                break
            if fits(self.solve(mid)):
                hi = mid
            else:
                lo = mid
        return lo, hi

    def reference(self) -> Choice:
        """The estimates, each slower than its original replaced by the fastest option within its parameters
        (or, with none, the smallest option)."""
        out = {}
        for n, opts in self.options.items():
            est, params = self.estimates[n], self.params[n]
            below = [r for r in opts if params[r] <= params[est]]
            if est in opts:
                out[n] = est
            elif below:
                out[n] = min(below, key=lambda r: (opts[r], -params[r]))
            else:
                out[n] = min(opts, key=lambda r: (params[r], opts[r]))
        return out

    def relaxed(self) -> Choice:
        """The Lagrangian solution: the fastest ranks, moved into ``[floor, budget]`` parameters."""
        sel = self.solve(0.0)
        if self.total(sel) > self.budget:  # too many parameters: pay where time per parameter is least
            return self.solve(self.boundary(0.0, self.big, lambda s: self.total(s) <= self.budget)[1])
        if self.total(sel) >= self.floor:
            return sel
        # the fastest ranks over-compress: buy parameters back where they cost least time
        most = self.solve(self.boundary(-self.big, 0.0, lambda s: self.total(s) <= self.budget)[1])  # all that fit
        if self.total(most) >= self.floor:
            sel = self.solve(self.boundary(-self.big, 0.0, lambda s: self.total(s) < self.floor)[0])  # the fewest
            if not self.floor <= self.total(sel) <= self.budget:
                sel = most
        else:
            sel = most
        return self.reach_floor(sel)

    def reach_floor(self, sel: Choice) -> Choice:
        """A discrete gap the relaxation cannot see: the cheapest upgrades that fit, until the floor."""
        while self.total(sel) < self.floor:
            spare = self.budget - self.total(sel)
            moves = [((opts[r] - opts[sel[n]]) / (self.params[n][r] - self.params[n][sel[n]]), n, r)
                     for n, opts in self.options.items() for r in opts
                     if 0 < self.params[n][r] - self.params[n][sel[n]] <= spare]
            if not moves:
                break
            _, n, r = min(moves)
            sel[n] = r
        return sel

    def no_slower_than_reference(self, sel: Choice) -> Choice:
        """Duality gap of a discrete choice: the reference unless ``sel`` fits and is at least as fast; when
        neither fits (a slow estimate whose faster ranks are all larger), the one closer to the budget."""
        ref = self.reference()
        fits, ref_fits = self.total(sel) <= self.budget, self.total(ref) <= self.budget
        if (ref_fits and (not fits or self.seconds(sel) > self.seconds(ref))
                or not fits and not ref_fits and self.total(ref) < self.total(sel)):
            return ref
        return sel

    def spend_on_ties(self, sel: Choice, tolerance: float) -> Choice:
        """Spare budget to ties: per layer, largest first, the larger rank within ``tolerance`` of its time."""
        sel, spare = dict(sel), self.budget - self.total(sel)
        for n in sorted(self.options, key=lambda n: -self.params[n][sel[n]]):
            opts, params = self.options[n], self.params[n]
            t0, p0 = opts[sel[n]], params[sel[n]]
            for r in sorted(opts, key=lambda r: -params[r]):
                extra = params[r] - p0
                if 0 < extra <= spare and opts[r] <= t0 * (1 + tolerance):
                    sel[n], spare = r, spare - extra
                    break
        return sel


class RankSearch(NamedTuple):
    """What :func:`choose_ranks` found: per layer the ranks (None keeps it dense) and the report's reason, cache
    statistics, and one timing row per measured candidate (the caller writes them: :func:`write_timings`)."""

    chosen: dict[str, tuple[int, ...] | None]
    reasons: dict[str, str]
    stats: dict[str, int]
    timings: list[dict[str, Any]]


def choose_ranks(plans: Sequence[LayerPlan], estimates: dict[str, tuple[int, ...] | None], *, window: float = 0.25,
                 step: int = 8, objective: str = "train", base: str = "ratio",
                 ratio: float = 2.0, energy: float = 0.95, tolerance: float = 0.03, budget: str = "model",
                 batch_size: int = 32,
                 device: DeviceInfo | None = None, precision: str = "32-true", channels_last: bool = False,
                 cache_dir: str | None = None, warmup: int = 3, steps: int = 10,
                 timer: Timer | None = None, compile: bool = False) -> RankSearch:
    """Per layer: the chosen ranks (None keeps it dense), a reason for the report, cache statistics and timings.

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
    measure = _Measure(cache, timer, dict(device=device, precision=canonical_precision(precision),
                                          batch_size=batch_size, objective=objective, channels_last=channels_last,
                                          warmup=warmup, steps=steps, compile=compile))
    chosen: dict[str, tuple[int, ...] | None] = {}
    reasons: dict[str, str] = {}
    all_times: dict[str, dict[tuple[int, ...] | None, float]] = {}
    for plan in tqdm(plans, desc="rank search", unit="layer", disable=None, leave=False):  # a terminal only
        est = estimates.get(plan.name)
        kept = _untimed_reason(plan, est)
        if kept:
            chosen[plan.name], reasons[plan.name] = None, kept
            continue
        energy_ranks = plan.energy_ranks(energy) if base == "energy" else None
        cands = candidate_ranks(plan, est, window=window, step=step, base=base, ratio=ratio,
                                energy_ranks=energy_ranks, per_layer=not model_budget)
        all_times[plan.name] = measure(plan, cands)
    timed = [p for p in plans if p.name in all_times]
    if model_budget:
        chosen.update(pick_within_budget(
            all_times, {p.name: {r: p.params_for(r) for r in all_times[p.name] if r is not None} for p in timed},
            {n: tuple(estimates[n]) for n in all_times}, tolerance))
    else:
        chosen.update({n: pick(t, tolerance) for n, t in all_times.items()})
    how = "optimized (model-wide budget)" if model_budget else "optimized"
    rows = []
    for plan in timed:
        times, est, choice = all_times[plan.name], tuple(estimates[plan.name]), chosen[plan.name]
        reasons[plan.name] = _reason(times, est, choice, how)
        rows += [{"layer": plan.name, "rank": -1 if ranks is None else ranks[0],
                  "rank_out": -1 if ranks is None else ranks[-1], "time_ms": t * 1e3, "objective": objective,
                  "device_name": device.name, "chosen": ranks == choice, "estimate": ranks == est}
                 for ranks, t in times.items()]
    log.info("rank search: %d timings measured, %d from cache", cache.misses, cache.hits)
    return RankSearch(chosen, reasons, {"timings_measured": cache.misses, "timings_cached": cache.hits}, rows)


def measure_times(plans: Sequence[LayerPlan], candidates: dict[str, list[tuple[int, ...]]], *, objective: str = "train",
                  batch_size: int = 32, device: DeviceInfo | None = None, precision: str = "32-true",
                  channels_last: bool = False, cache_dir: str | None = None, warmup: int = 3, steps: int = 10,
                  timer: Timer | None = None, compile: bool = False
                  ) -> tuple[dict[str, dict[Any, float]], dict[str, int]]:
    """Per layer, seconds of the dense layer (None) and of each candidate, timed as :func:`choose_ranks` times them
    (same cache); and the cache statistics. What ``rank.allocation`` spends a time budget by."""
    device = device or resolve_device("cpu")
    cache = TimingCache(None if timer is not None else cache_dir)
    measure = _Measure(cache, timer, dict(device=device, precision=canonical_precision(precision),
                                          batch_size=batch_size, objective=objective, channels_last=channels_last,
                                          warmup=warmup, steps=steps, compile=compile))
    times = {p.name: measure(p, candidates[p.name]) for p in plans if p.name in candidates}
    return times, {"timings_measured": cache.misses, "timings_cached": cache.hits}


def _untimed_reason(plan: LayerPlan, est: tuple[int, ...] | None) -> str:
    """Why a layer stays dense without timing anything, or "" when its candidates are to be timed."""
    if est is None:
        return "no estimate"
    if plan.params_for(tuple(est)) >= plan.params_dense:  # quantized would keep it too; nothing to time
        return f"kept: the estimate {_rank_key(tuple(est))} would not shrink it"
    return ""


class _Measure:
    """Times a layer's original and candidates: from the cache where it has them, else measured (or ``timer``)."""

    def __init__(self, cache: TimingCache, timer: Timer | None, settings: dict[str, Any]) -> None:
        self.cache, self.timer, self.settings = cache, timer, settings

    def __call__(self, plan: LayerPlan, cands: list[tuple[int, ...]]) -> dict[tuple[int, ...] | None, float]:
        s = self.settings
        key = TimingCache.key(plan, device_name=s["device"].name, precision=s["precision"],
                              batch_size=s["batch_size"], objective=s["objective"], channels_last=s["channels_last"],
                              compile=s["compile"], warmup=s["warmup"], steps=s["steps"])
        table = self.cache.load(key)
        times: dict[tuple[int, ...] | None, float] = {}
        for ranks in [None, *cands]:
            k = _rank_key(ranks)
            if k in table:
                self.cache.hits += 1
            else:
                self.cache.misses += 1
                table[k] = self.timer(plan, ranks) if self.timer is not None else time_layer(plan, ranks, **s)
            times[ranks] = table[k]
        self.cache.save(key, table)
        return times


def _reason(times: dict[tuple[int, ...] | None, float], est: tuple[int, ...], choice: tuple[int, ...] | None,
            how: str) -> str:
    """The report's reason for a timed layer: what it took, against the original and the estimate."""
    t_dense = times[None]
    if choice is None:
        return (f"kept: the original ({t_dense * 1e3:.3f} ms) was faster than every candidate "
                f"(best {min(v for r, v in times.items() if r is not None) * 1e3:.3f} ms)")
    return (f"{how}: {_rank_key(choice)} {times[choice] * 1e3:.3f} ms vs original {t_dense * 1e3:.3f} ms, "
            f"estimate {_rank_key(est)} {times.get(est, math.nan) * 1e3:.3f} ms")


TIMINGS_FILENAME = "rank_timings.csv"


def write_timings(output_dir: str, rows: list[dict[str, Any]]) -> None:
    """``<output_dir>/rank_timings.csv``: every timed candidate of a search (``paper_figures`` plots them)."""
    if not rows:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(os.path.join(output_dir, TIMINGS_FILENAME), text.getvalue())
