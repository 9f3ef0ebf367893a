"""The ranks ``rank.policy=optimized`` times for one layer: multiples of ``rank.step`` around its estimate that meet
the constraint (:mod:`lrd_exp.decompose.search` picks among them)."""

from __future__ import annotations

import math

from lrd_exp.decompose.plan import LayerPlan


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
