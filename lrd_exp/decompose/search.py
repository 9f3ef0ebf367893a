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
and the largest rank among them is taken (same speed, better accuracy).

This module picks; :mod:`~lrd_exp.decompose.candidates` says which ranks are timed,
:mod:`~lrd_exp.decompose.layer_timing` times them and keeps the timings on disk (keyed by everything that moves
them, so sweeps and later runs do not re-measure), :mod:`~lrd_exp.decompose.budget` solves the model-wide budget
and :mod:`~lrd_exp.decompose.rank_timings` writes the timings' CSV.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from lrd_exp.config.rank_settings import DEFAULTS as D
from lrd_exp.decompose.budget import BudgetProblem
from lrd_exp.decompose.candidates import candidate_ranks
from lrd_exp.decompose.layer_timing import LayerTimer, rank_key
from lrd_exp.decompose.plan import LayerPlan
from lrd_exp.decompose.rank_timings import timing_rows

log = logging.getLogger("lrd_exp")


class RankSearch(NamedTuple):
    """What :func:`choose_ranks` found: per layer the ranks (None keeps it dense) and the report's reason, cache
    statistics, and one timing row per measured candidate (the caller writes them:
    :func:`lrd_exp.decompose.rank_timings.write_timings`)."""

    chosen: dict[str, tuple[int, ...] | None]
    reasons: dict[str, str]
    stats: dict[str, int]
    timings: list[dict[str, Any]]


def choose_ranks(plans: Sequence[LayerPlan], estimates: dict[str, tuple[int, ...] | None], *,
                 window: float = D.window, step: int = D.step, base: str = D.base, ratio: float = D.ratio,
                 energy: float = D.energy, tolerance: float = D.tolerance, budget: str = D.budget, **timing: Any
                 ) -> RankSearch:
    """Per layer: the chosen ranks (None keeps it dense), a reason for the report, cache statistics and timings.

    ``estimates`` are the ``quantized`` ranks (already at ``rank.multiple``, so there is no ``multiple``
    here); the searched ranks around them are spaced by ``step``. A layer whose estimate would not shrink it
    stays dense untimed. ``timing``: how the candidates are timed and cached, :class:`LayerTimer`'s keywords
    (``objective``, ``batch_size``, ``device``, ``precision``, ``channels_last``, ``compile``, ``warmup``,
    ``steps``, ``cache_dir``, and ``timer``, which replaces the device measurement).
    ``budget="model"`` (with ``base="ratio"``) picks all layers together under the estimates' total parameters
    (:func:`pick_within_budget`); ``"layer"`` picks each layer alone under its own compression bound. Either
    way no layer is given a rank slower than its original.
    """
    model_budget = budget == "model" and base == "ratio"
    measure = LayerTimer(**timing)
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
        rows += timing_rows(plan.name, times, est, choice, objective=measure.settings["objective"],
                            device_name=measure.settings["device"].name)
    log.info("rank search: %d timings measured, %d from cache", measure.cache.misses, measure.cache.hits)
    return RankSearch(chosen, reasons, measure.stats, rows)


def _untimed_reason(plan: LayerPlan, est: tuple[int, ...] | None) -> str:
    """Why a layer stays dense without timing anything, or "" when its candidates are to be timed."""
    if est is None:
        return "no estimate"
    if plan.params_for(tuple(est)) >= plan.params_dense:  # quantized would keep it too; nothing to time
        return f"kept: the estimate {rank_key(tuple(est))} would not shrink it"
    return ""


def _reason(times: dict[tuple[int, ...] | None, float], est: tuple[int, ...], choice: tuple[int, ...] | None,
            how: str) -> str:
    """The report's reason for a timed layer: what it took, against the original and the estimate."""
    t_dense = times[None]
    if choice is None:
        return (f"kept: the original ({t_dense * 1e3:.3f} ms) was faster than every candidate "
                f"(best {min(v for r, v in times.items() if r is not None) * 1e3:.3f} ms)")
    return (f"{how}: {rank_key(choice)} {times[choice] * 1e3:.3f} ms vs original {t_dense * 1e3:.3f} ms, "
            f"estimate {rank_key(est)} {times.get(est, math.nan) * 1e3:.3f} ms")


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
    if not options:
        return chosen
    problem = BudgetProblem(options, params, estimates, slack)
    sel = problem.no_slower_than_reference(problem.relaxed())
    chosen.update(problem.spend_on_ties(sel, tolerance))
    return chosen
