"""Factorized layers, built from the layer they replace (tensorly-torch's ``from_linear`` / ``from_conv``).

Every class is built the same way: ``Class.from_linear(layer, *ranks)`` / ``Class.from_conv(conv, *ranks)`` returns
the initialised module (the maths is in :mod:`lrd_exp.decompose.functional`), and ``Class.like(layer, *ranks)``
the same structure with untrained factors (timing candidates, loading a saved model). Factors are child modules
named by position (``first``, ``core``, ``last``) so a freeze schedule can address them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lrd_exp.config.schema import FACTOR_POSITIONS as POSITIONS
from lrd_exp.decompose import functional as Fn
from lrd_exp.decompose import registry as R


class FactorizedLayer(nn.Module):
    """Base: a chain of factor modules applied in order."""

    kind: str = ""

    def factors(self) -> OrderedDict[str, nn.Module]:
        return OrderedDict((p, getattr(self, p)) for p in POSITIONS if hasattr(self, p))

    @property
    def ranks(self) -> tuple[int, ...]:
        raise NotImplementedError

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's / nn.Conv2d's name: a drop-in
        for factor in self.factors().values():
            input = factor(input)
        return input


def _factory(layer: nn.Module) -> dict:
    weight = R.weight_matrix(layer)  # a registered linear-like type may keep its weight under another name
    return {"device": weight.device, "dtype": weight.dtype}


class SVDLinear(FactorizedLayer):
    """``in -> r`` (no bias) then ``r -> out`` (original bias)."""

    kind = "svd"
    #: the registered linear-like type it replaces (what a merged layer is built as)
    dense_type: str = R.LINEAR.name

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, **factory) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, **factory)
        self.last = nn.Linear(rank, out_features, bias=bias, **factory)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.first.out_features,)

    @classmethod
    def like(cls, layer: nn.Module, rank: int) -> SVDLinear:
        """``layer``: any registered linear-like layer (:mod:`~lrd_exp.decompose.registry`); merging builds that
        type back."""
        in_features, out_features = R.linear_features(layer)
        new = cls(in_features, out_features, rank, R.linear_bias(layer) is not None, **_factory(layer))
        new.dense_type = R.linear_type(layer).name
        return new

    @classmethod
    def from_linear(cls, layer: nn.Module, rank: int, *, basis: Fn.Basis | None = None,
                    moment: torch.Tensor | None = None, cross: torch.Tensor | None = None,
                    spectrum: tuple[torch.Tensor, torch.Tensor] | None = None) -> SVDLinear:
        """Truncated SVD of the weight, or, given the input moment ``moment`` (X X^T of calibration inputs), the
        rank-``rank`` layer with the least output error; ``cross`` too (sequential calibration), the least error
        against the original's outputs. ``basis`` / ``spectrum``: what the surgery cached of the weight
        (:func:`~lrd_exp.decompose.functional.svd_fit`). ``layer``: ``nn.Linear`` or any registered linear-like
        layer (transformers' ``Conv1D``)."""
        factors = Fn.svd_fit(R.linear_weight(layer), rank, basis=basis, moment=moment, cross=cross, spectrum=spectrum)
        return cls.from_factors(layer, *factors)

    @classmethod
    def from_factors(cls, layer: nn.Module, first: torch.Tensor, last: torch.Tensor) -> SVDLinear:
        """The layer ``last @ first`` with ``layer``'s bias (first: r x in, last: out x r)."""
        new = cls.like(layer, first.shape[0])
        _load(new, layer, first=first, last=last)
        return new


class SVDConv1x1(FactorizedLayer):
    """1x1 conv as two 1x1 convs; stride and padding go on the first factor (it sees the input grid)."""

    kind = "svd"

    def __init__(self, in_channels: int, out_channels: int, rank: int, *, stride=1, padding=0, bias: bool = True,
                 padding_mode: str = "zeros", **factory) -> None:
        super().__init__()
        self.first = nn.Conv2d(in_channels, rank, 1, stride=stride, padding=padding, bias=False,
                               padding_mode=padding_mode, **factory)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias, **factory)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.first.out_channels,)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> SVDConv1x1:
        return cls(conv.in_channels, conv.out_channels, rank, stride=conv.stride, padding=conv.padding,
                   bias=conv.bias is not None, padding_mode=conv.padding_mode, **_factory(conv))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, *, basis: Fn.Basis | None = None,
                  moment: torch.Tensor | None = None, cross: torch.Tensor | None = None,
                  spectrum: tuple[torch.Tensor, torch.Tensor] | None = None) -> SVDConv1x1:
        """As :meth:`SVDLinear.from_linear`, on the out x in matrix of the 1x1 kernel."""
        factors = Fn.svd_fit(conv.weight.detach(), rank, basis=basis, moment=moment, cross=cross, spectrum=spectrum)
        return cls.from_factors(conv, *factors)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, first: torch.Tensor, last: torch.Tensor) -> SVDConv1x1:
        new = cls.like(conv, first.shape[0])
        _load(new, conv, first=first[:, :, None, None], last=last[:, :, None, None])
        return new


class Tucker2Conv(FactorizedLayer):
    """k x k conv as ``1x1 in->r1``, ``k x k r1->r2`` (original geometry), ``1x1 r2->out`` (original bias)."""

    kind = "tucker2"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank_in: int, rank_out: int, *, stride=1,
                 padding=0, dilation=1, bias: bool = True, padding_mode: str = "zeros", **factory) -> None:
        super().__init__()
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False, **factory)
        self.core = nn.Conv2d(rank_in, rank_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
                              bias=False, padding_mode=padding_mode, **factory)
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias, **factory)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (self.core.in_channels, self.core.out_channels)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank_in: int, rank_out: int) -> Tucker2Conv:
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank_in, rank_out, stride=conv.stride,
                   padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                   padding_mode=conv.padding_mode, **_factory(conv))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank_in: int, rank_out: int, *,
                  basis: tuple[torch.Tensor, torch.Tensor] | None = None, moment: torch.Tensor | None = None,
                  cross: torch.Tensor | None = None, spectrum: Fn.InputSpectrum | None = None) -> Tucker2Conv:
        """HOSVD init (``basis`` = (out-mode, in-mode) singular vectors if the caller already has them), or, given
        the im2col patch moment ``moment`` of calibration inputs (and ``cross``, as :meth:`SVDLinear.from_linear`),
        the fit to the conv's outputs (``spectrum``: the cached input spectrum;
        :func:`~lrd_exp.decompose.functional.tucker2_fit`)."""
        factors = Fn.tucker2_fit(conv.weight.detach(), rank_in, rank_out, bases=basis, moment=moment, cross=cross,
                                 spectrum=spectrum)
        return cls.from_factors(conv, *factors)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, first: torch.Tensor, core: torch.Tensor, last: torch.Tensor
                     ) -> Tucker2Conv:
        """(first: r1 x in, core: r2 x r1 x k x k, last: out x r2) with ``conv``'s geometry and bias."""
        new = cls.like(conv, first.shape[0], last.shape[1])
        _load(new, conv, first=first[:, :, None, None], core=core, last=last[:, :, None, None])
        return new


def _load(new: FactorizedLayer, layer: nn.Module, **factors: torch.Tensor) -> None:
    with torch.no_grad():
        for position, weight in factors.items():
            getattr(new, position).weight.copy_(weight)
        bias = R.layer_bias(layer)
        if bias is not None:
            new.last.bias.copy_(bias)


def reconstruct_weight(layer: FactorizedLayer) -> torch.Tensor:
    """The dense weight a factorized layer represents (for error reports, merging and tests)."""
    f = {p: m.weight.detach() for p, m in layer.factors().items()}
    if isinstance(layer, SVDLinear):
        return Fn.svd_reconstruct(f["first"], f["last"])
    if isinstance(layer, SVDConv1x1):
        return Fn.svd_reconstruct(f["first"], f["last"])[:, :, None, None]
    return Fn.tucker2_reconstruct(f["first"], f["core"], f["last"])
