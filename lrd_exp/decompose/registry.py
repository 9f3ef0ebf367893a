"""The layer types the surgery knows, in one place: linear-like types (how each is read as a matrix and built back),
packed types to unpack first (their projections become child modules), and parents that read a child's weight
themselves (those children stay dense). Register your own with :func:`register_linear`, :func:`register_unpacked`
and :func:`register_weight_reader`; the newest registration of a type wins. A type may be named by its import path
(``"module.path:ClassName"``): it is matched only once its module has been imported by whoever built the model, so
transformers is never imported here.

**Linear-like types.** A layer counts as a linear when it computes ``y = x W^T + b`` over the last dimension of its
input, whatever the layout of its weight. Each registered type says how to read its weight as ``out x in`` and its
bias, and how to build a layer of its own type from such a weight: a merged layer keeps the original's type, so the
parent module and a model file see the layout they expect. ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's
projections, the weight stored ``in x out``) are registered.

**Packed types.** torch's ``nn.MultiheadAttention`` keeps its query/key/value projections in one packed parameter;
its equivalent (:mod:`lrd_exp.decompose.attention`) has them as ``nn.Linear`` children. Only the exact class is
unpacked: a subclass may have a forward of its own.

**Weight readers.** ``nn.MultiheadAttention`` hands ``out_proj.weight`` to a function instead of calling
``out_proj``; a factorized layer there would break it. A reader may instead have a switch, a boolean attribute that,
off, makes it stop (``nn.TransformerEncoder.use_nested_tensor``): the surgery turns it off while anything under
those children is swapped. Readers inside a model's own code are found by tracing it
(:mod:`lrd_exp.decompose.runnable`); declare those whose forward is not traced (torch's own layers).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

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

    def resolve(self) -> type | None:
        return _loaded(self.name)

    def matches(self, module: nn.Module) -> bool:
        cls = self.resolve()
        return cls is not None and isinstance(module, cls)


def _loaded(name: str) -> type | None:
    """The class named ``module.path:ClassName``, if its module is loaded (no import: a module never loaded has
    built no such layer)."""
    module, _, qualname = name.partition(":")
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


_TYPES: dict[str, LinearType] = {}


def _name(cls: type | str) -> str:
    if isinstance(cls, str):
        if ":" not in cls:
            raise ValueError(f"register_linear: name the type as 'module.path:ClassName', got {cls!r}")
        return cls
    return f"{cls.__module__}:{cls.__qualname__}"


def register_linear(cls: type | str, *, weight: Callable[[nn.Module], torch.Tensor], build: Builder,
                    bias: Callable[[nn.Module], torch.Tensor | None] | None = None) -> LinearType:
    """Declare a layer type linear-like: the surgery factorizes it like ``nn.Linear`` (SVD, activation fit,
    report, freezing, model file, merge, FLOPs).

    ``cls``: the class, or its import path ``"module.path:ClassName"`` (matched once that module is loaded).
    ``weight(layer)``: its weight as an ``out x in`` tensor. ``build(cls, weight, bias)``: a layer of the class
    computing ``x @ weight.T + bias``, on ``weight``'s device and dtype (what a merged layer becomes).
    ``bias(layer)``: its bias or None (default: ``layer.bias``). A parent that reads an attribute of it (``weight``,
    ``in_features``, ...) keeps it dense: :mod:`lrd_exp.decompose.runnable` finds those.
    """
    kwargs = {"bias": bias} if bias is not None else {}
    entry = LinearType(_name(cls), weight, build, **kwargs)
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


LINEAR = register_linear(nn.Linear, weight=lambda m: m.weight, build=_linear)
CONV1D = register_linear("transformers.pytorch_utils:Conv1D", weight=lambda m: m.weight.T, build=_conv1d)


# ------------------------------------------------------------------------------------------------ packed types
@dataclass(frozen=True)
class PackedType:
    """A layer type unpacked before the surgery: ``unpack(layer)`` builds its equivalent with the projections as
    child modules (named ``module.path:function`` it is imported when first used)."""

    name: str
    unpack: Callable[[nn.Module], nn.Module] | str

    def build(self, module: nn.Module) -> nn.Module:
        unpack = self.unpack
        if isinstance(unpack, str):
            path, _, qualname = unpack.partition(":")
            unpack = importlib.import_module(path)
            for part in qualname.split("."):
                unpack = getattr(unpack, part)
        return unpack(module)


_PACKED: dict[str, PackedType] = {}


def register_unpacked(cls: type | str, unpack: Callable[[nn.Module], nn.Module] | str) -> PackedType:
    """Declare a layer type to unpack before the surgery: ``unpack(layer)`` returns a module computing the same
    whose projections are linear-like children (which the surgery then factorizes); a layer of the exact class
    only is unpacked, and put back where nothing inside it was factorized. ``unpack`` may be named by its import
    path ``"module.path:Class.from_torch"``."""
    entry = PackedType(_name(cls), unpack)
    _PACKED.pop(entry.name, None)
    _PACKED[entry.name] = entry
    return entry


def packed_type(module: nn.Module) -> PackedType | None:
    """The registration ``module``'s exact class has as a packed type, or None."""
    for entry in reversed(list(_PACKED.values())):
        if _loaded(entry.name) is type(module):
            return entry
    return None


#: the attribute an unpacked module carries: the registered packed type it was made from (the model file records it)
UNPACKED_FROM = "_lrd_unpacked_from"


def unpacked(module: nn.Module) -> nn.Module:
    """The equivalent of ``module`` if its type is registered as packed (marked with :data:`UNPACKED_FROM`), else
    ``module`` itself."""
    entry = packed_type(module)
    if entry is None:
        return module
    new = entry.build(module)
    setattr(new, UNPACKED_FROM, entry.name)
    return new


def unpacked_names(model: nn.Module) -> list[str]:
    """The names the linear-like and conv layers inside ``model``'s packed layers get once unpacked (the root is
    never unpacked): what a ``rank.include`` pattern may name before the surgery has run."""
    out = []
    for name, m in model.named_modules():
        if name and packed_type(m) is not None:
            out += [f"{name}.{n}" for n, c in unpacked(m).named_modules()
                    if n and (is_linear(c) or isinstance(c, nn.Conv2d))]
    return out


# ------------------------------------------------------------------------------------------------ weight readers
@dataclass(frozen=True)
class WeightReader:
    """A parent type whose forward reads some children's weights itself instead of calling them."""

    name: str
    children: tuple[str, ...]
    switch: str | None = None  # a boolean attribute that, set False, stops it reading them

    def resolve(self) -> type | None:
        return _loaded(self.name)

    def matches(self, module: nn.Module) -> bool:
        cls = self.resolve()
        return cls is not None and isinstance(module, cls)


_READERS: dict[str, WeightReader] = {}


def register_weight_reader(cls: type | str, children: tuple[str, ...], *, switch: str | None = None
                           ) -> WeightReader:
    """Declare that a layer of ``cls`` (or a subclass) reads the weights of its ``children`` itself: a linear-like
    or conv child there stays dense, with the reason in the report. With ``switch``, the name of a boolean
    attribute that, False, makes the layer call them instead, the surgery turns it off while any module under
    those children is swapped (unpacked or factorized) and restores it once none is. Only parents whose forward
    the surgery cannot trace need declaring (torch's own layers: a model's own code is traced)."""
    entry = WeightReader(_name(cls), tuple(children), switch)
    _READERS.pop(entry.name, None)
    _READERS[entry.name] = entry
    return entry


def weight_readers(module: nn.Module) -> list[WeightReader]:
    """The registrations ``module`` matches as a parent that reads its children's weights."""
    return [entry for entry in _READERS.values() if entry.matches(module)]


def is_declared(module: nn.Module) -> bool:
    """Whether the surgery knows ``module``'s type from a registration (so a trace does not look inside it)."""
    return is_linear(module) or packed_type(module) is not None or bool(weight_readers(module))


_ATTENTION = "lrd_exp.decompose.attention"
for _cls, _equivalent in ((nn.MultiheadAttention, "FactorizableMultiheadAttention"),
                          (nn.TransformerEncoderLayer, "FactorizableEncoderLayer"),
                          (nn.TransformerDecoderLayer, "FactorizableDecoderLayer")):
    register_unpacked(_cls, f"{_ATTENTION}:{_equivalent}.from_torch")
# F.multi_head_attention_forward takes out_proj.weight; the encoder / decoder layers' inference fast path hands
# linear1/linear2.weight to a fused kernel (a subclass stays packed, so these apply)
register_weight_reader(nn.MultiheadAttention, ("out_proj",))
register_weight_reader(nn.TransformerEncoderLayer, ("linear1", "linear2"))
register_weight_reader(nn.TransformerDecoderLayer, ("linear1", "linear2"))
# the encoder's nested-tensor path reads its layers' packed weights
register_weight_reader(nn.TransformerEncoder, ("layers",), switch="use_nested_tensor")
