"""``rank.allocation``: one budget for the whole model, spent where the layers' damage is least.

Per-layer errors are not comparable across layers (a thin layer that the output depends on can have a small
relative error and still turn predictions), so each layer's damage is that of the whole model's outputs on
``damage_images`` calibration samples with that layer alone cut at a candidate rank, against the original's (KL for
class scores, else relative output error): measured by running each cut, or estimated to second order from one
pass (``rank.damage_by``, :mod:`lrd_exp.decompose.damage`). The candidates are the ranks at a few per-layer
compressions (:data:`LAYER_RATIOS`), at multiples of ``rank.multiple``, the uniform ranks, and the dense layer
(damage 0). Damages are cached on disk like the rank timings.

The predicted damage of a whole allocation is the sum of its layers' damages. ``global`` picks the ranks of least
predicted damage whose total parameters (or forward FLOPs, or measured seconds) stay within the uniform ranks'
total; ``fastest`` picks the ranks of least measured time whose predicted damage stays within ``max_damage`` (null:
the uniform ranks' own). Both are :class:`lrd_exp.decompose.budget.BudgetProblem`'s Lagrangian, then single and
paired exchanges while one improves; neither is ever worse than the uniform ranks by its own objective.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from torch import nn

from lrd_exp.batches import Batch, batch_size_of
from lrd_exp.config.rank_settings import DEFAULTS, RankSettings
from lrd_exp.decompose import ranks as R
from lrd_exp.decompose.budget import solve
from lrd_exp.decompose.calibration import calibration_batches
from lrd_exp.decompose.damage import Builder, layer_damage, rank_key
from lrd_exp.decompose.layer_timing import measure_times
from lrd_exp.decompose.plan import LayerPlan, Ranks
from lrd_exp.decompose.policies import ratio_ranks

log = logging.getLogger("lrd_exp")

#: per-layer compressions whose ranks are candidates (quantized to ``rank.multiple``, deduplicated): a grid that
#: covers model ratios 1.5 to 16 without measuring every multiple of a wide layer
LAYER_RATIOS = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)

Choice = dict[str, Ranks]
__all__ = ["Allocation", "allocate", "allocation_candidates", "layer_costs", "solve"]


def allocation_candidates(plan: LayerPlan, multiple: int, uniform: Ranks = None) -> list[tuple[int, ...]]:
    """The ranks a layer's damage is measured at: one per :data:`LAYER_RATIOS` compression at ``multiple``, and the
    uniform ranks; only those that shrink the layer (the dense layer is the other option)."""
    found = {tuple(uniform)} if uniform is not None else set()
    for c in LAYER_RATIOS:
        raw = ratio_ranks(plan, replace(DEFAULTS, ratio=c))
        found.add(tuple(R.quantize_rank(min(r, f), multiple, f) for r, f in zip(raw, plan.full_ranks)))
    return sorted(r for r in found if plan.params_for(r) < plan.params_dense)


# ------------------------------------------------------------------------------------------ the policy
class Allocation(NamedTuple):
    """What :func:`allocate` chose: per layer the ranks (None: dense), the report's reason, the predicted damage,
    and the whole allocation's numbers (``report.allocation``)."""

    chosen: Choice
    reasons: dict[str, str]
    damage: dict[str, float]
    summary: dict[str, Any]


def layer_costs(plans: Sequence[LayerPlan], options: dict[str, list[Ranks]], budget_by: str,
                times: dict[str, dict[Ranks, float]] | None = None) -> dict[str, dict[Ranks, float]]:
    """Per layer and option what it spends of a ``budget_by`` budget: parameters, forward FLOPs, or seconds."""
    out: dict[str, dict[Ranks, float]] = {}
    for p in plans:
        if budget_by == "time":
            out[p.name] = {r: times[p.name][r] for r in options[p.name]}
        elif budget_by == "flops":
            flops = {r: p.forward_flops(r) for r in options[p.name]}
            if any(f is None for f in flops.values()):
                raise ValueError(f"rank.budget_by=flops: layer {p.name} has no activation shape; pass example_input "
                                 "or calibration to decompose_model")
            out[p.name] = flops
        else:
            out[p.name] = {r: float(p.params_dense if r is None else p.params_for(r)) for r in options[p.name]}
    return out


def allocate(model: nn.Module, plans: Sequence[LayerPlan], uniform: Choice, settings: RankSettings,
             batches: Sequence[Batch], build: Builder, *, context: dict[str, Any] | None = None, seed: int = 0,
             fit_key: str = "") -> Allocation:
    """``rank.allocation=global`` or ``fastest`` (``settings``) over the layers of ``plans``, starting from the
    ``uniform`` ranks the policy gives. ``context`` holds the rank search's timing context (time budgets and
    ``fastest``) and ``damage_cache_dir``."""
    context = dict(context or {})
    damage_dir = context.pop("damage_cache_dir", None)
    if not batches:
        raise ValueError(f"rank.allocation={settings.allocation} measures each layer's damage on calibration "
                         "inputs: pass calibration= to decompose_model")
    uniform = {p.name: None if uniform.get(p.name) is None or p.params_for(tuple(uniform[p.name])) >= p.params_dense
               else tuple(uniform[p.name]) for p in plans}
    cands = {p.name: allocation_candidates(p, settings.multiple, uniform[p.name]) for p in plans}
    live = [p for p in plans if cands[p.name]]
    for p in live:
        if p.moments is not None:
            p.energy_spectra()  # the whitened spectra, computed once and reused by every candidate's fit
    subset = calibration_batches(list(batches), settings.damage_images)
    damage, stats = layer_damage(model, live, cands, subset, build, method=settings.damage_by,
                                 cache_dir=damage_dir, fit=settings.fit, fit_key=fit_key, seed=seed)
    options = {p.name: [None, *cands[p.name]] for p in live}
    needs_time = settings.allocation == "fastest" or settings.budget_by == "time"
    times = None
    if needs_time:
        times, timing = measure_times(live, cands, objective=settings.objective, **context)
        stats.update(timing)
    ref = {p.name: uniform[p.name] for p in live}
    chosen, summary = _spend(live, options, ref, damage, times, settings)
    summary.update(damage_images=sum(batch_size_of(b) for b in subset), **stats)
    reasons = {n: _reason(settings.allocation, r, ref[n], damage[n]) for n, r in chosen.items()}
    return Allocation(chosen, reasons, {n: damage[n][r] for n, r in chosen.items()}, summary)


def _spend(plans: Sequence[LayerPlan], options: dict[str, list[Ranks]], ref: Choice,
           damage: dict[str, dict[Ranks, float]], times: dict[str, dict[Ranks, float]] | None,
           settings: RankSettings) -> tuple[Choice, dict[str, Any]]:
    """The chosen options and the allocation's numbers: ``global`` (least damage within the uniform ranks' cost) or
    ``fastest`` (least time within the damage bound)."""
    if settings.allocation == "global":
        cost = layer_costs(plans, options, settings.budget_by, times)
        chosen = solve(damage, cost, ref)
        budget = sum(cost[n][r] for n, r in ref.items())
        spent = sum(cost[n][r] for n, r in chosen.items())
    else:
        cost = {n: {r: times[n][r] for r in options[n]} for n in options}
        budget = settings.max_damage
        budget = sum(damage[n][r] for n, r in ref.items()) if budget is None else budget
        chosen = solve(cost, damage, ref, budget=budget)
        spent = sum(damage[n][r] for n, r in chosen.items())
    summary = {"allocation": settings.allocation,
               "budget_by": settings.budget_by if settings.allocation == "global" else "damage",
               "budget": budget, "spent": spent, "predicted_damage": sum(damage[n][r] for n, r in chosen.items()),
               "uniform_predicted_damage": sum(damage[n][r] for n, r in ref.items())}
    if times is not None:
        summary["predicted_s"] = sum(times[n][r] for n, r in chosen.items())
        summary["uniform_predicted_s"] = sum(times[n][r] for n, r in ref.items())
    return chosen, summary


def _reason(allocation: str, ranks: Ranks, uniform: Ranks, damage: dict[Ranks, float]) -> str:
    where = "dense: no candidate's damage was worth what it saves" if ranks is None else rank_key(ranks)
    return (f"allocation={allocation}: {where}, predicted damage {damage[ranks]:.3g} (uniform {rank_key(uniform)}: "
            f"{damage[uniform]:.3g})")
