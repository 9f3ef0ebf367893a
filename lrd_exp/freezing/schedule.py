"""Freeze schedules: which factors of the decomposed layers are frozen at each point of training.

Two readings of the paper are supported (see docs/freezing.md): ``sequential`` (progressive: freeze more factors
stage by stage, least important first) and ``alternating`` (only some factor positions train at a time), plus
the static ablations ``first``, ``last`` and ``largest``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lrd_exp.config.validate import freeze_values
from lrd_exp.config.values import check_freeze
from lrd_exp.freezing.factors import (
    Factor,
    collect_factors,
    frozen_parameters,
    measure_factor_costs,
    set_frozen,
)


class FreezeSchedule:
    """Which factors are frozen at a point in training (``t`` in the schedule's unit: epochs or steps)."""

    def __init__(self, cfg: Any, factors: Sequence[Factor]) -> None:
        values = freeze_values(cfg)
        check_freeze(**values)
        self.kind = values["schedule"]
        self.unit, self.warmup, self.period = values["unit"], values["warmup"], values["period"]
        self.per_stage, self.final_fraction = values["per_stage"], values["final_fraction"]
        self.importance, self.positions, self.phases = values["importance"], values["positions"], values["phases"]
        self.freeze_bias = values["freeze_bias"]
        self.factors = list(factors)
        self.candidates = [f for f in self.factors if f.position in self.positions]
        if self.kind == "sequential" and self.factors and not self.candidates:
            have = sorted({f.position for f in self.factors})
            raise ValueError(f"freeze.positions={list(self.positions)} selects no factor of the decomposed model: "
                             f"its factors are at {', '.join(have)}")
        self.costs: dict[str, int] | None = None  # importance=cost: factor_costs(); else 2 x weight elements
        self.user_frozen = frozen_parameters(self.factors)  # frozen before the schedule: never thawed by it

    def apply(self, frozen: Iterable[Factor]) -> None:
        """Freeze ``frozen`` and let the other factors train, except what the user froze before the schedule."""
        set_frozen(self.factors, frozen, self.freeze_bias, keep_frozen=self.user_frozen)

    # ------------------------------------------------------------------ sequential
    @property
    def per_stage_count(self) -> int:
        n = len(self.candidates)
        return max(1, math.ceil(self.per_stage * n)) if self.per_stage < 1 else int(self.per_stage)

    @property
    def final_count(self) -> int:
        return int(math.floor(self.final_fraction * len(self.candidates) + 1e-9))

    def stage_at(self, t: int) -> int:
        """Sequential: 0 before the first freeze, then one more every period."""
        if t < self.warmup:
            return 0
        return (t - self.warmup) // self.period + 1

    def n_frozen_at_stage(self, stage: int) -> int:
        return min(stage * self.per_stage_count, self.final_count)

    @property
    def n_stages(self) -> int:
        """Number of distinct sequential stages: the all-trainable one only with a warm-up (without one the first
        freeze happens at t=0), then one per freezing stage until the final count."""
        if self.final_count == 0:
            return 1
        return math.ceil(self.final_count / self.per_stage_count) + (1 if self.warmup > 0 else 0)

    def static_order(self) -> list[Factor]:
        """Freeze order without measurements (depth / reverse_depth / size / cost; measured signals fall back to
        depth)."""
        if self.importance == "cost":  # the most weight-gradient FLOPs first: the most time saved per stage
            costs = self.costs or {}
            return sorted(self.candidates, key=lambda f: (-costs.get(f.key, 2 * f.numel), f.depth))
        if self.importance == "reverse_depth":
            return sorted(self.candidates, key=lambda f: -f.depth)
        if self.importance == "size":
            return sorted(self.candidates, key=lambda f: (-f.numel, f.depth))
        return sorted(self.candidates, key=lambda f: f.depth)

    # ------------------------------------------------------------------ all schedules
    def phase_at(self, t: int) -> int:
        if t < self.warmup:
            return -1
        return (t - self.warmup) // self.period % len(self.phases)

    def static_frozen(self) -> list[Factor]:
        if self.kind == "first":
            return [f for f in self.factors if f.position == "first"]
        if self.kind == "last":
            return [f for f in self.factors if f.position == "last"]
        if self.kind == "largest":
            by_layer: dict[str, Factor] = {}
            for f in self.factors:
                if f.layer not in by_layer or f.numel > by_layer[f.layer].numel:
                    by_layer[f.layer] = f
            return list(by_layer.values())
        return []

    def state_key(self, t: int) -> int:
        """Changes exactly when the frozen set may change."""
        if self.kind == "sequential":
            return self.n_frozen_at_stage(self.stage_at(t))
        if self.kind == "alternating":
            return self.phase_at(t)
        return 0

    def frozen_at(self, t: int, order: Sequence[Factor] | None = None,
                  already: Iterable[Factor] = ()) -> list[Factor]:
        """The factors frozen at ``t``. Sequential keeps ``already`` frozen and adds from ``order``."""
        if self.kind == "none":
            return []
        if self.kind in ("first", "last", "largest"):
            return self.static_frozen()
        if self.kind == "alternating":
            phase = self.phase_at(t)
            if phase < 0:
                return []
            return [f for f in self.factors if f.position not in self.phases[phase]]
        n = self.n_frozen_at_stage(self.stage_at(t))
        frozen = list(already)[:n]
        keys = {f.key for f in frozen}
        for f in order if order is not None else self.static_order():
            if len(frozen) >= n:
                break
            if f.key not in keys:
                frozen.append(f)
                keys.add(f.key)
        return frozen

    def timeline(self, total: int) -> list[tuple[int, int, list[Factor]]]:
        """(start, length, frozen factors) of each distinct state over ``total`` units, static order.

        The benchmark measures every state and weights it by its length (time-weighted average).
        """
        segments: list[tuple[int, int, list[Factor]]] = []
        frozen: list[Factor] = []
        key = None
        for t in range(max(total, 1)):
            k = self.state_key(t)
            if k != key:
                frozen = self.frozen_at(t, already=frozen if self.kind == "sequential" else ())
                segments.append((t, 0, list(frozen)))
                key = k
            s, length, fz = segments[-1]
            segments[-1] = (s, length + 1, fz)
        return segments



@dataclass
class FreezeState:
    """One state of a freeze schedule and the share of training it lasts."""

    weight: float
    frozen: list[str]
    label: str = ""
    freeze_bias: bool = False  # the schedule's freeze.freeze_bias: the frozen factors' biases are frozen too


def schedule_states(model: nn.Module, freeze_cfg: Any, total_units: int,
                    history: list[dict[str, Any]] | None = None,
                    example_input: Any = None) -> list[FreezeState]:
    """The states a schedule goes through over ``total_units``, from a run's history when there is one.

    ``example_input`` (one sample: a tensor, tuple or dict) gives ``importance=cost`` the factors' real
    weight-gradient FLOPs.
    """
    factors = collect_factors(model)
    schedule = FreezeSchedule(freeze_cfg, factors)
    if schedule.importance == "cost" and example_input is not None and not history:
        schedule.costs = measure_factor_costs(model, example_input)
    total_units = max(int(total_units), 1)
    if history:
        starts = [h["t"] for h in history] + [total_units]
        states = []
        for h, end in zip(history, starts[1:]):
            states.append(FreezeState(max(end - h["t"], 0), list(h["frozen"]), f"{schedule.unit}>={h['t']}"))
        states = [s for s in states if s.weight > 0] or states[-1:]
    else:
        states = [FreezeState(length, [f.key for f in frozen], f"{schedule.unit}>={start}")
                  for start, length, frozen in schedule.timeline(total_units)]
    merged: dict[tuple[str, ...], FreezeState] = {}  # alternating phases repeat: measure each set once
    for s in states:
        key = tuple(sorted(s.frozen))
        if key in merged:
            merged[key].weight += s.weight
        else:
            merged[key] = s
    states = list(merged.values())
    total = sum(s.weight for s in states) or 1
    for s in states:
        s.weight = s.weight / total
        s.freeze_bias = schedule.freeze_bias
    return states
