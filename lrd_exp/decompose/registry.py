"""Linear-like layer types: how the surgery reads each one as a matrix, and how a dense one is built back.

A layer counts as a linear when it computes ``y = x W^T + b`` over the last dimension of its input, whatever the
layout of its weight. Each registered type says how to read its weight as ``out x in`` and its bias, and how to
build a layer of its own type from such a weight: a merged layer keeps the original's type, so the parent module
and a model file see the layout they expect. ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's projections,
the weight stored ``in x out``) are registered. A type may be named by its import path: it is matched only once
its module has been imported by whoever built the model, so transformers is never imported here.

Register your own with :func:`register_linear`; the newest registration of a type wins.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

#: (the registered class, a weight out x in, a bias or None) -> a dense layer of that class computing x W^T + b
Builder = Callable[[type, torch.Tensor, "torch.Tensor | None"], nn.Module]


@dataclass(frozen=True)
class LinearType:
    """One registered linear-like layer type."""

    name: str  # "module.path:ClassName"
    weight: Callable[[nn.Module], torch.Tensor]  # the weight as out x in (a view of the parameter)
    build: Builder
    bias: Callable[[nn.Module], torch.Tensor | None] = lambda m: getattr(m, "bias", None)
    #: attributes of the dense layer a parent may read itself (a factorized layer in its place lacks them)
    attributes: frozenset[str] = field(default_factory=frozenset)

    def resolve(self) -> type | None:
        """The class, if its module is loaded (no import: a module never loaded has built no such layer)."""
        module, _, qualname = self.name.partition(":")
        obj = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        return obj if isinstance(obj, type) else None

    def matches(self, module: nn.Module) -> bool:
        cls = self.resolve()
        return cls is not None and isinstance(module, cls)


_TYPES: dict[str, LinearType] = {}


def _name(cls: type | str) -> str:
    if isinstance(cls, str):
        if ":" not in cls:
            raise ValueError(f"register_linear: name the type as 'module.path:ClassName', got {cls!r}")
        return cls
    return f"{cls.__module__}:{cls.__qualname__}"


def register_linear(cls: type | str, *, weight: Callable[[nn.Module], torch.Tensor], build: Builder,
                    bias: Callable[[nn.Module], torch.Tensor | None] | None = None,
                    attributes: tuple[str, ...] = ()) -> LinearType:
    """Declare a layer type linear-like: the surgery factorizes it like ``nn.Linear`` (SVD, activation fit,
    report, freezing, model file, merge, FLOPs).

    ``cls``: the class, or its import path ``"module.path:ClassName"`` (matched once that module is loaded).
    ``weight(layer)``: its weight as an ``out x in`` tensor. ``build(cls, weight, bias)``: a layer of the class
    computing ``x @ weight.T + bias``, on ``weight``'s device and dtype (what a merged layer becomes).
    ``bias(layer)``: its bias or None (default: ``layer.bias``). ``attributes``: what a parent may read of it
    besides ``weight`` / ``bias`` (a parent that does keeps it dense).
    """
    kwargs = {"bias": bias} if bias is not None else {}
    entry = LinearType(_name(cls), weight, build, attributes=frozenset(attributes), **kwargs)
    _TYPES.pop(entry.name, None)
    _TYPES[entry.name] = entry  # the newest last: looked up first
    return entry


def linear_type(module: nn.Module) -> LinearType | None:
    """The registered type ``module`` is an instance of (the newest registration first), or None."""
    for entry in reversed(list(_TYPES.values())):
        if entry.matches(module):
            return entry
    return None


def is_linear(module: nn.Module) -> bool:
    return linear_type(module) is not None


def _entry(module: nn.Module) -> LinearType:
    entry = linear_type(module)
    if entry is None:
        raise TypeError(f"{type(module).__name__} is not a registered linear-like layer type")
    return entry


def linear_weight(module: nn.Module) -> torch.Tensor:
    """A linear-like layer's weight as ``out x in``, detached."""
    return _entry(module).weight(module).detach()


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return _entry(module).bias(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    out_f, in_f = linear_weight(module).shape
    return int(in_f), int(out_f)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as the surgery sees it, detached: ``out x in`` for a linear-like layer, a conv's own kernel."""
    return linear_weight(module) if is_linear(module) else module.weight.detach()


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """A linear-like layer's bias by its type, any other layer's ``.bias``."""
    return linear_bias(module) if is_linear(module) else getattr(module, "bias", None)


def dense_attributes() -> frozenset[str]:
    """Every registered type's declared attributes: what a parent may read of a layer a factorized one replaced."""
    return frozenset().union(*(entry.attributes for entry in _TYPES.values()))


def build_dense(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A layer of the registered type ``name`` computing ``x @ weight.T + bias`` (a merged layer)."""
    entry = _TYPES.get(name)
    cls = entry.resolve() if entry is not None else None
    if cls is None:
        raise ValueError(f"no linear-like layer type {name!r} is registered and loaded")
    with torch.no_grad():
        return entry.build(cls, weight.detach(), None if bias is None else bias.detach())


def _linear(cls: type, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _conv1d(cls: type, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """transformers' ``Conv1D(nf=out, nx=in)``: weight ``in x out``, always a bias."""
    layer = cls(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=weight.dtype)
    layer.weight.copy_(weight.T)
    layer.bias.copy_(bias if bias is not None else torch.zeros_like(layer.bias))
    return layer


LINEAR = register_linear(nn.Linear, weight=lambda m: m.weight, build=_linear,
                         attributes=("in_features", "out_features"))
CONV1D = register_linear("transformers.pytorch_utils:Conv1D", weight=lambda m: m.weight.T, build=_conv1d,
                         attributes=("nf", "nx"))
