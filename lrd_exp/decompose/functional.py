"""The linear algebra of low-rank decomposition, kept apart from the modules (tensorly-torch's ``functional``).

Truncated SVD for matrices (linear layers, 1x1 convs) and Tucker-2 / HOSVD for k x k conv kernels, with the
reconstruction and approximation error of each. Factors are computed in float64 when the weight is float64
(exactness tests), otherwise in float32.
"""

from __future__ import annotations

import torch

Basis = tuple[str, torch.Tensor, torch.Tensor]


def work_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def svd_basis(w: torch.Tensor) -> Basis:
    """Singular vectors of the smaller side and the singular values (descending) of a matrix.

    Eigen-decomposition of the small Gram matrix: the same subspaces as an SVD at a fraction of its cost on
    wide matrices. Returns ("left", U, s) or ("right", V, s).
    """
    w = w.to(work_dtype(w))
    side = "left" if w.shape[0] <= w.shape[1] else "right"
    gram = w @ w.T if side == "left" else w.T @ w
    evals, evecs = torch.linalg.eigh(gram)
    return side, evecs.flip(1), evals.flip(0).clamp_min(0).sqrt()


def svd_factors(w: torch.Tensor, rank: int, basis: Basis | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``W ~= U_r S_r V_r^T`` split as sqrt(S) on each side (both factors well scaled).

    Returns (first = sqrt(S_r) V_r^T (r x in), last = U_r sqrt(S_r) (out x r)).
    """
    side, vecs, s = basis if basis is not None else svd_basis(w)
    wd = w.to(vecs.dtype)
    vecs, s_r = vecs[:, :rank], s[:rank]
    root = s_r.sqrt()
    inv_root = 1.0 / root.clamp_min(torch.finfo(s.dtype).tiny ** 0.25)
    if side == "left":  # U_r^T W = S_r V_r^T
        first = inv_root[:, None] * (vecs.T @ wd)
        last = vecs * root[None, :]
    else:  # W V_r = U_r S_r
        first = root[:, None] * vecs.T
        last = (wd @ vecs) * inv_root[None, :]
    return first, last


def svd_error(singular_values: torch.Tensor, rank: int) -> float:
    """||W - W_r||_F / ||W||_F of the rank-``rank`` truncation (Eckart-Young: the optimum)."""
    sq = singular_values.double() ** 2
    return (sq[rank:].sum() / sq.sum().clamp_min(1e-300)).sqrt().item()


def mode_singular(w: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of a conv weight's channel-mode unfolding (0: out, 1: in).

    Uses the eigen-decomposition of the (small) Gram matrix: the same subspace as the SVD at a fraction of
    the cost for the wide unfoldings of k x k convs.
    """
    w = w.to(work_dtype(w))
    unfolded = w.transpose(0, mode).flatten(1)
    evals, evecs = torch.linalg.eigh(unfolded @ unfolded.T)
    return evecs.flip(1), evals.flip(0).clamp_min(0).sqrt()


def tucker2_factors(w: torch.Tensor, rank_in: int, rank_out: int,
                    bases: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HOSVD of a conv kernel on its channel modes: (first: r1 x in, core: r2 x r1 x k x k, last: out x r2).

    ``bases`` = (out-mode, in-mode) singular vectors when the caller already has them.
    """
    wd = w.to(work_dtype(w))
    u_out, u_in = bases if bases is not None else (mode_singular(w, 0)[0], mode_singular(w, 1)[0])
    u_out, u_in = u_out[:, :rank_out].to(wd.dtype), u_in[:, :rank_in].to(wd.dtype)
    core = torch.einsum("oikl,or,is->rskl", wd, u_out, u_in)
    return u_in.T, core, u_out


def tucker2_error(w: torch.Tensor, core: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F of an HOSVD with orthonormal factors: the energy the core does not hold."""
    w, core = w.double(), core.double()
    w_norm2 = (w * w).sum()
    return ((w_norm2 - (core * core).sum()) / w_norm2.clamp_min(1e-300)).clamp_min(0).sqrt().item()


def svd_reconstruct(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``last @ first`` of two matrix (or 1x1-conv) factors, as a matrix."""
    return last.flatten(1) @ first.flatten(1)


def tucker2_reconstruct(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The k x k kernel of a Tucker-2 chain: ``last x core x first`` contracted over the ranks."""
    return torch.einsum("or,rskl,si->oikl", last.flatten(1), core, first.flatten(1))
