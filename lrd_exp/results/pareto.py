"""The speed-versus-damage frontier of a set of configurations, and the one worth training.

A configuration is on the frontier (Pareto-optimal) when no other one is at least as fast *and* at least as
accurate, and strictly better in one of the two. The recommendation is a point of that frontier: the fastest under
an error bound when the user gives one, otherwise the knee, where more speed starts to cost disproportionate error.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def pareto_mask(df: pd.DataFrame, maximize: str, minimize: str) -> pd.Series:
    """True for the rows no other row dominates (higher or equal ``maximize``, lower or equal ``minimize``, one
    strictly); rows with a missing value are never on the frontier. Ties are all kept."""
    ok = df[maximize].notna() & df[minimize].notna()
    speed = df.loc[ok, maximize].to_numpy(float)
    error = df.loc[ok, minimize].to_numpy(float)
    on = np.ones(len(speed), dtype=bool)
    for i in range(len(speed)):
        at_least = (speed >= speed[i]) & (error <= error[i])
        better = (speed > speed[i]) | (error < error[i])
        on[i] = not np.any(at_least & better)
    mask = pd.Series(False, index=df.index)
    mask.loc[ok[ok].index] = on
    return mask


def recommend(df: pd.DataFrame, maximize: str, minimize: str, *, max_error: float | None = None,
              candidates: pd.Series | None = None) -> object | None:
    """The index of the frontier row to train, or None when no candidate is on the frontier (or under the bound).

    ``candidates`` limits the choice (e.g. not the original itself, which is a reference point). With
    ``max_error``: the fastest frontier candidate whose error is at most that. Otherwise the knee: with both axes
    scaled to [0, 1] over the frontier, the candidate furthest above the line from its most accurate to its fastest
    point (the largest scaled speed minus scaled error); a tie goes to the more accurate row.
    """
    front = df[pareto_mask(df, maximize, minimize)]
    choice = front if candidates is None else front[candidates.reindex(front.index, fill_value=False)]
    if max_error is not None:
        choice = choice[choice[minimize] <= max_error]
    if choice.empty:
        return None
    if max_error is not None:
        return choice.sort_values([maximize, minimize], ascending=[False, True]).index[0]

    def scaled(col: str) -> pd.Series:
        lo, hi = front[col].min(), front[col].max()
        return (choice[col] - lo) / (hi - lo) if hi > lo else choice[col] * 0.0

    gain = (scaled(maximize) - scaled(minimize)).round(12)
    best = gain[gain == gain.max()].index
    return choice.loc[best].sort_values(minimize).index[0]
