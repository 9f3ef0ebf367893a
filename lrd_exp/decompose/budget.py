"""One budget shared by the layers, each taking one of its options: a multiple-choice knapsack.

The rank search (:func:`lrd_exp.decompose.search.pick_within_budget`) minimises seconds within parameters;
``rank.allocation`` (:mod:`lrd_exp.decompose.allocation`) minimises measured damage within parameters, FLOPs or
seconds, or seconds within damage. Both start from the Lagrangian of :class:`BudgetProblem`; :func:`solve` then
exchanges options while one improves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Option = Any  # one layer's option: a ranks tuple, or None for the dense layer
Choice = dict[str, Option]  # layer -> its option


class BudgetProblem:
    """A multiple-choice knapsack over layers: per layer its options (option -> the cost minimised) and what each
    spends of one shared budget (``params``), by default the estimates' total."""

    def __init__(self, options: dict[str, dict[Option, float]], params: dict[str, dict[Option, float]],
                 estimates: dict[str, Option], slack: float, budget: float | None = None) -> None:
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


def solve(objective: dict[str, dict[Option, float]], cost: dict[str, dict[Option, float]], reference: Choice,
          budget: float | None = None, max_rounds: int = 500) -> Choice:
    """Per layer one option: the least total ``objective`` whose total ``cost`` stays within ``budget`` (default: the
    reference's total cost).

    The Lagrangian of :class:`BudgetProblem` (each layer minimises ``objective + lam * cost``, ``lam`` bisected),
    then exchanges while one lowers the objective within the budget: one layer to another option, or two at once
    (one gives budget up, the other takes it). Exact wherever each layer's options lie on their convex hull; never
    worse than the reference when the reference fits."""
    problem = BudgetProblem(objective, cost, reference, slack=0.0, budget=budget)
    best = _exchange(problem, problem.relaxed(), max_rounds)
    if problem.total(reference) <= problem.budget * (1 + 1e-12):
        from_ref = _exchange(problem, dict(reference), max_rounds)
        if problem.seconds(from_ref) < problem.seconds(best):
            best = from_ref
    return best


def _moves(problem: BudgetProblem, sel: Choice) -> list[tuple[float, float, str, Option]]:
    """Every single change of one layer's option: (change of cost, change of objective, layer, option)."""
    out = []
    for n, opts in problem.options.items():
        c0, o0 = problem.params[n][sel[n]], opts[sel[n]]
        out += [(problem.params[n][r] - c0, opts[r] - o0, n, r) for r in opts if r != sel[n]]
    return out


def _exchange(problem: BudgetProblem, sel: Choice, max_rounds: int) -> Choice:
    """Improve ``sel`` by single or paired changes that keep it within the budget, best objective gain per unit of
    budget first (a change that frees budget and lowers the objective first of all)."""
    sel = dict(sel)
    tol = 1e-12 * max(abs(problem.budget), 1.0)
    for _ in range(max_rounds):
        spare = problem.budget - problem.total(sel)
        moves = _moves(problem, sel)
        singles = [m for m in moves if m[1] < -1e-15 and m[0] <= spare + tol]
        if singles:
            _, _, n, r = min(singles, key=lambda m: (1, m[1] / m[0]) if m[0] > 0 else (0, m[1]))
            sel[n] = r
            continue
        pair = _best_pair(moves, spare + tol)
        if pair is None:
            break
        for _, _, n, r in pair:
            sel[n] = r
    return sel


def _best_pair(moves: list[tuple[float, float, str, Option]], spare: float, limit: int = 4000
               ) -> tuple[tuple[float, float, str, Option], ...] | None:
    """Two changes of two layers that fit together and lower the objective most; None if none does (or too many
    moves to pair: ``limit``)."""
    if len(moves) > limit:
        return None
    down = [m for m in moves if m[0] < 0]  # gives budget up
    up = [m for m in moves if m[0] > 0 and m[1] < 0]  # takes budget, lowers the objective
    best, gain = None, -1e-15
    for a in down:
        for b in up:
            if a[2] != b[2] and a[0] + b[0] <= spare and a[1] + b[1] < gain:
                best, gain = (a, b), a[1] + b[1]
    return best
