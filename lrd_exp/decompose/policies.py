"""``rank.policy``: the ranks each policy gives one layer, in one table (:data:`POLICY_RANKS`).

A policy is a function ``(plan, settings) -> ranks`` (None keeps the layer dense). ``optimized`` is not here: it
times candidates around ``quantized``'s ranks (:mod:`lrd_exp.decompose.search`); ``none`` decomposes nothing. To
add a policy, add its function to :data:`POLICY_RANKS` and its name to ``lrd_exp.config.values.POLICIES`` (the
values the config accepts; a test checks that the two agree), as ``docs/ranks.md`` says.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any

from lrd_exp.config.rank_settings import RankSettings
from lrd_exp.decompose import ranks as R
from lrd_exp.decompose.plan import LayerPlan, Ranks


def ratio_ranks(plan: LayerPlan, s: RankSettings) -> Ranks:
    """The ranks that compress the layer's parameters by ``rank.ratio`` (the paper's rank formula)."""
    if plan.kind == "svd":
        return (R.svd_rank_for_ratio(plan.n_in, plan.n_out, s.ratio),)
    r = R.tucker2_rank_for_ratio(plan.n_in, plan.n_out, plan.k2, s.ratio)
    return (min(r, plan.n_in), min(r, plan.n_out))


def energy_ranks(plan: LayerPlan, s: RankSettings) -> Ranks:
    """The least ranks that keep ``rank.energy`` of the (whitened, with calibration) spectra's energy."""
    return plan.energy_ranks(s.energy)


def quantized_ranks(plan: LayerPlan, s: RankSettings) -> Ranks:
    """``rank.base``'s ranks (ratio or energy) rounded to multiples of ``rank.multiple`` (``rank.rounding``)."""
    ranks = energy_ranks(plan, s) if s.base == "energy" else ratio_ranks(plan, s)
    return tuple(R.quantize_rank(r, s.multiple, full, s.rounding) for r, full in zip(ranks, plan.full_ranks))


def fixed_ranks(plan: LayerPlan, s: RankSettings) -> Ranks:
    """``rank.rank``: one rank for every layer, or the first matching ``{name pattern: rank}`` (no match: dense)."""
    r = _fixed_rank(plan.name, s.rank)
    return None if r is None else tuple(min(r, full) for full in plan.full_ranks)


def _fixed_rank(name: str, rank: Any) -> int | None:
    if isinstance(rank, Mapping):
        for pattern, value in rank.items():
            if fnmatch.fnmatchcase(name, pattern):
                return R.check_rank(value, f"rank.rank[{pattern!r}]")
        return None
    return R.check_rank(rank)


#: every per-layer policy by name; ``optimized`` searches around ``quantized``'s ranks
POLICY_RANKS: dict[str, Callable[[LayerPlan, RankSettings], Ranks]] = {
    "ratio": ratio_ranks, "energy": energy_ranks, "quantized": quantized_ranks, "fixed": fixed_ranks,
}
#: policies that are not a per-layer function: optimized (measured, search.py) and none (nothing decomposed)
SEARCHED, NOTHING = "optimized", "none"
