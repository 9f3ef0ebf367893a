"""The linear algebra of low-rank decomposition, kept apart from the modules (tensorly-torch's ``functional``).

Truncated SVD for matrices (linear layers, 1x1 convs) and Tucker-2 / HOSVD for k x k conv kernels, with the
reconstruction and approximation error of each. Factors are computed in float64 when the weight is float64
(exactness tests), otherwise in float32.
"""

from __future__ import annotations

from typing import NamedTuple

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


# ------------------------------------------------------------------ fitted to the layer's outputs (calibration)
# ``H`` is the uncentred second moment of the layer's inputs over the calibration positions: in x in for a linear
# layer or 1x1 conv, the im2col patch moment (in*k*k)^2 for a k x k conv. The output error of a weight W' is
# tr((W - W') H (W - W')^T), which these closed forms minimise instead of ||W - W'||_F.


def psd_eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors and eigenvalues of a symmetric PSD matrix, largest first, values clamped at 0."""
    evals, evecs = torch.linalg.eigh((a + a.T) / 2)
    return evecs.flip(1), evals.flip(0).clamp_min(0)


def psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    """The symmetric square root ``S = H^1/2`` of a PSD moment ``H`` (``S S^T = H``): the whitening every fit to the
    outputs multiplies the weight by."""
    q, lam = psd_eigh(a)
    return (q * lam.sqrt()[None, :]) @ q.T


def psd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` for a symmetric PSD ``a`` by Cholesky, with jitter (a ridge relative to ``a``'s mean diagonal)
    added until it factors: singular moments come from dead channels, all-zero inputs, or fewer calibration
    positions than dimensions."""
    n = a.shape[0]
    scale = a.diagonal().abs().mean().clamp_min(1e-30).item()
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    for jitter in (0.0, 1e-6, 1e-3, 1e-1):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale * eye if jitter else a)
        # a factorization that succeeds on rounding-level pivots (a numerically singular moment) would amplify noise
        if info.item() == 0 and chol.diagonal().min().item() ** 2 > 1e-10 * scale:
            return torch.cholesky_solve(b, chol)
    return torch.linalg.pinv(a, hermitian=True) @ b


def output_error(w: torch.Tensor, w_hat: torch.Tensor, moment: torch.Tensor) -> float:
    """Relative output error ``||(W - W') X||_F / ||W X||_F`` from the input moment ``X X^T`` (weights flattened to
    out x in*k*k). Computed in the weight's precision (float32 unless it is float64): a report, not a fit."""
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    m = moment.to(dtype)
    w, d = w.flatten(1).to(dtype), (w.to(dtype) - w_hat.to(dtype)).flatten(1)
    both = torch.cat([w, d]) @ m
    n = w.shape[0]
    den = (both[:n] * w).sum().double().clamp_min(1e-300)
    return (both[n:] * d).sum().double().clamp_min(0).div(den).sqrt().item()


def whitened_spectrum(w: torch.Tensor, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of ``W S`` (``S S^T = H``): the principal output subspace of the
    layer on the calibration inputs. From the eigen-decomposition of the smaller of ``W H W^T`` (out x out) and
    ``S^T W^T W S`` (in x in, with ``S = H^1/2``); no ``S^-1`` is ever formed."""
    w = w.flatten(1).to(moment.dtype)
    if w.shape[0] <= w.shape[1]:
        u, evals = psd_eigh(w @ moment @ w.T)
        return u, evals.sqrt()
    ws = w @ psd_sqrt(moment)
    v, evals = psd_eigh(ws.T @ ws)
    s = evals.sqrt()
    u = (ws @ v) / s.clamp_min(1e-300)[None, :]
    return torch.where(s[None, :] > s.max().clamp_min(1e-300) * 1e-12, u, torch.zeros_like(u)), s


def whitened_svd_factors(w: torch.Tensor, rank: int, moment: torch.Tensor,
                         spectrum: tuple[torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM's closed form: the rank-``rank`` W' minimising ``||(W - W') X||_F``, as (first r x in, last out x r).

    With ``W S = U E V^T``: last = ``U_r E_r^1/2`` and first = ``E_r^1/2 V_r^T S^-1`` = ``E_r^-1/2 U_r^T W``, so
    ``W' = U_r U_r^T W`` projects the outputs onto their principal subspace; a zero singular value (a dead output)
    gives a zero row, never inf or NaN.
    """
    u, s = spectrum if spectrum is not None else whitened_spectrum(w, moment)
    wd = w.flatten(1).to(moment.dtype)
    u_r, s_r = u[:, :rank], s[:rank]
    live = s_r > s_r.max().clamp_min(1e-300) * 1e-12
    root = torch.where(live, s_r.sqrt(), torch.zeros_like(s_r))
    inv_root = torch.where(live, 1.0 / s_r.clamp_min(1e-300).sqrt(), torch.zeros_like(s_r))
    first = inv_root[:, None] * (u_r.T @ wd)
    last = u_r * root[None, :]
    return first, last


def channel_moment(patch_moment: torch.Tensor, n_in: int) -> torch.Tensor:
    """The input-channel moment (in x in) of a conv, summed over the kernel positions of its patch moment."""
    k2 = patch_moment.shape[0] // n_in
    return patch_moment.reshape(n_in, k2, n_in, k2).diagonal(dim1=1, dim2=3).sum(-1)


class InputSpectrum(NamedTuple):
    """The whitened input-channel spectrum of a k x k conv (:func:`tucker2_input_spectrum`), with the channel
    whitening ``S`` it was computed under: the fit reuses both."""

    vectors: torch.Tensor  # in x in, right singular vectors of M S, largest first
    values: torch.Tensor  # their singular values
    whitening: torch.Tensor  # S = C^1/2 of the channel moment C


def _slices(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stacked k x k slices ``M`` (out*k*k x in) of a conv kernel."""
    return w.to(dtype).permute(0, 2, 3, 1).reshape(-1, w.shape[1])


def tucker2_input_spectrum(w: torch.Tensor, moment: torch.Tensor) -> InputSpectrum:
    """Right singular vectors and values of the stacked k x k slices ``M`` (out*k*k x in) times the channel whitening
    ``S = C^1/2``: the input-channel subspace that keeps most of the output (and its spectrum, for energy ranks)."""
    s_half = psd_sqrt(channel_moment(moment, w.shape[1]))
    ms = _slices(w, moment.dtype) @ s_half
    v, evals = psd_eigh(ms.T @ ms)
    return InputSpectrum(v, evals.sqrt(), s_half)


def tucker2_fitted_factors(w: torch.Tensor, rank_in: int, rank_out: int, moment: torch.Tensor,
                           input_spectrum: InputSpectrum | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a k x k conv fitted to its outputs (patch moment ``moment``): (first, core, last) as
    :func:`tucker2_factors`.

    The input factor spans the top ``rank_in`` whitened input directions (:func:`tucker2_input_spectrum`): the row
    space of ``V_r^T S^-1``, written ``V_r^T S M^T M`` so that no inverse is formed, orthonormalised. Given it, the
    core and output factor are the exact minimisers of ``||(W - W~) X||_F``: the least-squares conv on the projected
    inputs ``G = W Sigma F^T (F Sigma F^T)^-1``, whose outputs' principal ``rank_out`` subspace is the output factor.
    """
    n_out, n_in, kh, kw = w.shape
    k2 = kh * kw
    v, _, s_half = input_spectrum if input_spectrum is not None else tucker2_input_spectrum(w, moment)
    m = _slices(w, moment.dtype)
    basis = (m.T @ (m @ (s_half @ v[:, :rank_in])))  # in x r1, the row space of V_r^T S M^T M, transposed
    first = torch.linalg.qr(basis)[0].T  # r1 x in, orthonormal rows
    # Sigma F^T as in x k2 x r1 x k2, and F Sigma F^T: F acts on the channel index of each kernel position. The
    # large products run in the weight's precision (float32 unless float64); the solve in float64.
    gemm = torch.float64 if w.dtype == torch.float64 else torch.float32
    f = first.to(gemm)
    sig = moment.to(gemm).reshape(n_in, k2, n_in, k2).permute(0, 1, 3, 2).reshape(-1, n_in)  # (i, p, q) x j
    sig_f = (sig @ f.T).reshape(n_in, k2, k2, rank_in).permute(0, 1, 3, 2)  # i, p, r, q
    a = (f @ sig_f.reshape(n_in, -1)).reshape(rank_in * k2, rank_in * k2).to(moment.dtype)
    b = (w.to(gemm).reshape(n_out, n_in * k2) @ sig_f.reshape(n_in * k2, rank_in * k2)).to(moment.dtype)
    g = psd_solve(a, b.T).T  # out x r1*k2: the best conv on the projected inputs
    u, _ = psd_eigh(g @ b.T)  # G (F Sigma F^T) G^T = G B^T: the covariance of its outputs
    last = u[:, :rank_out]
    core = (last.T @ g).reshape(rank_out, rank_in, kh, kw)
    return first, core, last


def least_squares_target(w: torch.Tensor, moment: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Sequential ("asymmetric") calibration: the weight A with ``||W X - W' X^||^2 = const + ||(A - W') X^||^2``,
    A = ``W (X X^T^) (X^ X^T^)^-1``, for the original inputs X and the decomposed model's X^ (``moment`` = X^ X^T^,
    ``cross`` = X X^T^)."""
    shape = w.shape
    wd = w.flatten(1).to(moment.dtype)
    return psd_solve(moment, (wd @ cross).T).T.reshape(shape)


def svd_fit(w: torch.Tensor, rank: int, *, basis: Basis | None = None, moment: torch.Tensor | None = None,
            cross: torch.Tensor | None = None, spectrum: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` factors (first r x in, last out x r) of a matrix or 1x1 kernel ``w``, by what the fit has:
    the weight alone (truncated SVD; ``basis``, its :func:`svd_basis` if cached), the input moment (fitted to the
    outputs; ``spectrum``, the :func:`whitened_spectrum` of ``w`` if cached), or with ``cross`` as well (sequential
    calibration: fitted to the :func:`least_squares_target`, whose spectrum no cache holds)."""
    w = w.flatten(1)
    if moment is None:
        return svd_factors(w, rank, basis)
    if cross is not None:
        w, spectrum = least_squares_target(w, moment, cross), None
    return whitened_svd_factors(w, rank, moment, spectrum)


def tucker2_fit(w: torch.Tensor, rank_in: int, rank_out: int, *,
                bases: tuple[torch.Tensor, torch.Tensor] | None = None, moment: torch.Tensor | None = None,
                cross: torch.Tensor | None = None, spectrum: InputSpectrum | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Tucker-2 factors (first, core, last) of a k x k kernel, chosen as :func:`svd_fit` chooses: HOSVD
    (``bases``: cached (out-mode, in-mode) singular vectors), the fit to the outputs (``spectrum``: the cached
    :func:`tucker2_input_spectrum`), or the fit to the least-squares target."""
    if moment is None:
        return tucker2_factors(w, rank_in, rank_out, bases)
    if cross is not None:
        w, spectrum = least_squares_target(w, moment, cross), None
    return tucker2_fitted_factors(w, rank_in, rank_out, moment, spectrum)


def paired_output_error(w: torch.Tensor, w_hat: torch.Tensor, original: torch.Tensor, cross: torch.Tensor,
                        moment: torch.Tensor) -> float:
    """Relative error ``||W X - W' X^||_F / ||W X||_F`` of sequential calibration, from X X^T, X X^T^ and X^ X^T^."""
    w, v = w.flatten(1).to(moment.dtype), w_hat.flatten(1).to(moment.dtype)
    ref = ((w @ original) * w).sum()
    err = ref - 2 * ((w @ cross) * v).sum() + ((v @ moment) * v).sum()
    return err.clamp_min(0).div(ref.clamp_min(1e-300)).sqrt().item()
