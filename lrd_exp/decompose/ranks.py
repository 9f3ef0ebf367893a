"""Rank estimation: from a compression ratio, from an energy threshold, and quantization to a multiple.

Parameter counts (biases excluded, they are unchanged): SVD ``r (in + out)`` vs ``in * out``;
Tucker-2 ``in r1 + k^2 r1 r2 + r2 out`` vs ``in out k^2``.
"""

from __future__ import annotations

import math

import torch

from lrd_exp.config.values import check_energy, check_multiple, check_rank, check_ratio, check_rounding

__all__ = ["check_rank", "energy_rank", "quantize_rank", "svd_params", "svd_rank_for_ratio", "tucker2_params",
           "tucker2_rank_for_ratio"]


def svd_params(n_in: int, n_out: int, rank: int) -> int:
    return rank * (n_in + n_out)


def tucker2_params(n_in: int, n_out: int, k2: int, rank_in: int, rank_out: int) -> int:
    return n_in * rank_in + k2 * rank_in * rank_out + rank_out * n_out


def svd_rank_for_ratio(n_in: int, n_out: int, ratio: float) -> int:
    """Largest rank whose factors are at least ``ratio`` times smaller than the dense matrix (>= 1)."""
    r = math.floor(n_in * n_out / (check_ratio(ratio) * (n_in + n_out)) + 1e-9)
    return max(1, min(r, n_in, n_out))


def tucker2_rank_for_ratio(n_in: int, n_out: int, k2: int, ratio: float) -> int:
    """r1 = r2 = r solving ``k^2 r^2 + (in + out) r = in out k^2 / c``, floored, >= 1."""
    target = n_in * n_out * k2 / check_ratio(ratio)
    b = n_in + n_out
    r = (-b + math.sqrt(b * b + 4 * k2 * target)) / (2 * k2)
    return max(1, min(math.floor(r + 1e-9), n_in, n_out))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared singular-value mass."""
    check_energy(energy)
    sq = singular_values.double() ** 2
    total = sq.sum()
    if total <= 0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1
    return max(1, min(r, singular_values.numel()))


def quantize_rank(rank: int, multiple: int, full: int, rounding: str = "nearest") -> int:
    """Round ``rank`` to a multiple of ``multiple``: never 0, never above ``full``.

    If rounding up would pass the full rank, the largest multiple below it is used; if ``multiple`` exceeds
    the full rank, the full rank is returned (the layer then does not shrink and is left as it is).
    """
    check_multiple(multiple)
    rounding = check_rounding(rounding)
    if multiple > full:
        return full
    q = rank / multiple
    n = {"nearest": math.floor(q + 0.5), "up": math.ceil(q), "down": math.floor(q)}[rounding]
    n = max(1, n)
    if n * multiple > full:
        n = full // multiple
    return n * multiple
