"""One candidate layer of a decomposition and what a rank policy needs to decide about it: its shapes, parameter
and FLOP counts, and (cached) the spectra its ranks come from. Shared by surgery (the policies) and search (the
measured ranks)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lrd_exp.decompose import calibration as C
from lrd_exp.decompose import functional as Fn
from lrd_exp.decompose import ranks as R
from lrd_exp.decompose.functional import mode_singular, svd_basis
from lrd_exp.decompose.registry import is_linear, weight_matrix

#: a layer's ranks, or None for the dense layer (kept as it is)
Ranks = tuple[int, ...] | None


@dataclass
class LayerPlan:
    """One candidate layer and everything a rank policy needs to decide about it."""

    name: str
    module: nn.Module
    kind: str  # svd | tucker2
    n_in: int
    n_out: int
    k2: int  # kernel area (1 for svd)
    in_shape: tuple[int, ...] | None = None  # per-sample input shape seen in the example forward
    out_shape: tuple[int, ...] | None = None
    #: (in_shape, out_shape) of every call in the example forward: a layer called twice costs twice
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    moments: C.Moments | None = None  # input moments on the calibration inputs (fit=activations)
    fit_note: str = ""  # why a layer of an activation fit was fitted to its weights
    _spectra: dict = field(default_factory=dict, repr=False)

    @property
    def full_ranks(self) -> tuple[int, ...]:
        return (min(self.n_in, self.n_out),) if self.kind == "svd" else (self.n_in, self.n_out)

    @property
    def params_dense(self) -> int:
        return self.n_in * self.n_out * self.k2

    def params_for(self, ranks: tuple[int, ...]) -> int:
        if self.kind == "svd":
            return R.svd_params(self.n_in, self.n_out, ranks[0])
        return R.tucker2_params(self.n_in, self.n_out, self.k2, *ranks)

    def weight(self) -> torch.Tensor:
        """The layer's weight, detached: ``out x in`` for any linear-like layer (a ``Conv1D`` stores it transposed),
        the conv's kernel otherwise."""
        return weight_matrix(self.module)

    def svd_matrix(self) -> torch.Tensor:
        return self.weight().flatten(1)

    def svd_basis(self) -> tuple[str, torch.Tensor, torch.Tensor]:
        if "svd" not in self._spectra:
            self._spectra["svd"] = svd_basis(self.svd_matrix())
        return self._spectra["svd"]

    def singular_values(self) -> torch.Tensor:
        return self.svd_basis()[2]

    def mode_bases(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((U_out, s_out), (U_in, s_in)) of the conv weight's channel unfoldings (cached)."""
        if "modes" not in self._spectra:
            w = self.weight()
            self._spectra["modes"] = (mode_singular(w, 0), mode_singular(w, 1))
        return self._spectra["modes"]

    def energy_spectra(self) -> tuple[torch.Tensor, ...]:
        """The spectra whose energy gives the ranks, in rank order: the weight's singular values (per channel mode
        for Tucker-2), or with calibration moments the whitened ones (the output error's own spectrum)."""
        if self.moments is None:
            if self.kind == "svd":
                return (self.singular_values(),)
            (_, s_out), (_, s_in) = self.mode_bases()
            return (s_in, s_out)
        if "whitened" not in self._spectra:
            w, m = self.weight(), self.moments.moment
            out = Fn.whitened_spectrum(w, m)
            self._spectra["whitened"] = out if self.kind == "svd" else (Fn.tucker2_input_spectrum(w, m), out)
        spectra = self._spectra["whitened"]
        return (spectra[1],) if self.kind == "svd" else (spectra[0][1], spectra[1][1])

    def cached_whitened_spectra(self) -> Any:
        """The whitened spectra :meth:`energy_spectra` computed, if it did (the fit reuses them), else None."""
        return self._spectra.get("whitened")

    def release(self) -> None:
        """Drop the moments and cached spectra once the layer is replaced (they can be large)."""
        self.moments = None
        self._spectra.clear()

    def energy_ranks(self, energy: float) -> tuple[int, ...]:
        return tuple(R.energy_rank(s, energy) for s in self.energy_spectra())

    def forward_flops(self, ranks: tuple[int, ...] | None) -> int | None:
        """Per-sample forward FLOPs (2 per multiply-add) of the dense layer (ranks None) or its factors, summed over
        the calls of the example forward."""
        calls = self.calls or ([(self.in_shape, self.out_shape)] if self.in_shape and self.out_shape else [])
        if not calls:
            return None
        return sum(self._call_flops(ranks, shape_in, shape_out) for shape_in, shape_out in calls)

    def _call_flops(self, ranks: tuple[int, ...] | None, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
                    ) -> int:
        if is_linear(self.module):
            tokens = math.prod(in_shape) // self.n_in
            per_token = self.n_in * self.n_out if ranks is None else ranks[0] * (self.n_in + self.n_out)
            return 2 * tokens * per_token
        hw_in = math.prod(in_shape[1:])
        hw_out = math.prod(out_shape[1:])
        if ranks is None:
            return 2 * hw_out * self.n_out * self.n_in * self.k2 // self.module.groups
        if self.kind == "svd":
            return 2 * hw_out * ranks[0] * (self.n_in + self.n_out)
        r1, r2 = ranks
        return 2 * (hw_in * self.n_in * r1 + hw_out * (r1 * r2 * self.k2 + r2 * self.n_out))
