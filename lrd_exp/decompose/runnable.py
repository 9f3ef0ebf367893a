"""Keeping a model runnable through the surgery: one mechanism for every swap, a packed layer unpacked or a layer
factorized.

A swapped-in module lacks what a parent may read of the original itself (``F.linear(x, self.b.weight)``, a fused
path reading ``in_proj_weight``). Such layers are found before any swap where possible: the registry declares the
readers whose forward is not traced (torch's own layers, :mod:`lrd_exp.decompose.registry`), and one ``torch.fx``
trace of the model finds its own code's (a ``get_attr`` of a layer's parameter). Only where the model cannot be
traced, or a forward after the swaps still fails (a read the trace cannot see: a plain attribute), trial forwards
record the attributes looked up on the swapped-in modules that their originals had, and give those swaps back;
a failure that names none gives back the newest swap first, until the model runs. Every swap is recorded in one
:class:`Swaps` per surgery, with the readers' switches it turned off: nothing is kept at module level.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from torch import fx, nn

from lrd_exp.decompose import calibration as C
from lrd_exp.decompose import registry as R
from lrd_exp.decompose.attention import swap_module
from lrd_exp.decompose.layers import FactorizedLayer

log = logging.getLogger("lrd_exp")


def run_eval(model: nn.Module, batch: C.Batch, what: str = "the example input") -> Any:
    """One forward of a batch (tensor, tuple or dict) in eval mode without autograd; modes are restored."""
    with C.EvalModes(model):
        return C.run_batch(model, batch, what)


def _swappable(module: nn.Module) -> bool:
    return R.is_linear(module) or isinstance(module, nn.Conv2d) or R.packed_type(module) is not None


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every type the registry knows (and every conv) a leaf: their own forward reads their
    own weights, and what it reads of their children is declared."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, FactorizedLayer)) or R.is_declared(m) or super().is_leaf_module(
            m, module_qualified_name)


def traced_reads(model: nn.Module) -> dict[str, str] | None:
    """The layers (linear-like, conv, packed) whose parameter or buffer the model's own code reads directly
    (name -> the attribute), from one ``torch.fx`` trace; None when the model cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow, unsupported inputs: the trial forwards decide instead
        return None
    modules = dict(model.named_modules())
    reads: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            if owner in modules and _swappable(modules[owner]):
                reads.setdefault(owner, attr)
    return reads


def declared_reads(model: nn.Module) -> dict[str, str]:
    """Layers whose parent is a declared weight reader (:func:`~lrd_exp.decompose.registry.register_weight_reader`
    without a switch): they stay dense (name -> reason)."""
    out = {}
    for name, m in model.named_modules():
        for reader in R.weight_readers(m):
            cls = reader.resolve()
            for child in reader.children if reader.switch is None else ():
                layer = getattr(m, child, None)
                if R.is_linear(layer) or isinstance(layer, nn.Conv2d):
                    out[f"{name}.{child}" if name else child] = (f"read directly by its {cls.__module__}."
                                                                 f"{cls.__name__} ({child}.weight)")
    return out


class Watched(NamedTuple):
    """A module a swap brought in, and the one of the original it stands for."""

    swap: str  # the swap's name
    module: nn.Module
    counterpart: nn.Module


class Swaps:
    """Every module the surgery swapped in ``model`` (name -> the original, oldest first), and the switches of weight
    readers it turned off meanwhile (a reader's switch is off while anything under its children is swapped)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.originals: dict[str, nn.Module] = {}
        self._readers = [(m, [f"{name}.{c}" if name else c for c in reader.children], reader.switch)
                         for name, m in model.named_modules() for reader in R.weight_readers(m) if reader.switch]
        self._switched: dict[tuple[int, str], Any] = {}

    def swap(self, name: str, new: nn.Module) -> None:
        """Put ``new`` wherever the module at ``name`` is registered (a shared module stays shared)."""
        original = self.model.get_submodule(name)
        swap_module(self.model, original, new)
        self.originals.setdefault(name, original)
        self._switch()

    def give_back(self, name: str) -> None:
        swap_module(self.model, self.model.get_submodule(name), self.originals.pop(name))
        self._switch()

    def give_back_all(self) -> None:
        """The model as it was: every swap given back, newest first."""
        for name in reversed(list(self.originals)):
            self.give_back(name)

    def _switch(self) -> None:
        for reader, prefixes, switch in self._readers:
            key = (id(reader), switch)
            swapped = any(s == p or s.startswith(p + ".") for s in self.originals for p in prefixes)
            if swapped and key not in self._switched:
                self._switched[key] = getattr(reader, switch)
                setattr(reader, switch, False)
            elif not swapped and key in self._switched:
                setattr(reader, switch, self._switched.pop(key))

    def watched(self, names: Iterable[str]) -> dict[int, Watched]:
        """The modules the swaps of ``names`` brought in (a replacement and its new descendants that stand for one of
        the original's), by id."""
        out = {}
        for name in names:
            original, new = self.originals[name], self.model.get_submodule(name)
            kept = {id(m) for m in original.modules()}
            for path, m in new.named_modules():
                if id(m) not in kept and _has_submodule(original, path):
                    out.setdefault(id(m), Watched(name, m, original.get_submodule(path)))
        return out


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


@contextlib.contextmanager
def _missing_lookups(watched: dict[int, Watched]) -> Iterator[dict[str, str]]:
    """Record, during the block, the attributes looked up on the watched modules and missing there that their
    counterparts have (swap name -> the first such attribute): what a parent reads of them as the layers they
    replaced. The lookup is wrapped on the watched modules' classes while the block runs."""
    seen: dict[int, list[str]] = {}
    patched = {}
    for cls in {type(w.module) for w in watched.values()}:
        own, previous = cls.__dict__.get("__getattr__"), cls.__getattr__

        def lookup(self: nn.Module, name: str, previous: Any = previous) -> Any:
            try:
                return previous(self, name)
            except AttributeError:
                if id(self) in watched:
                    seen.setdefault(id(self), []).append(name)
                raise

        patched[cls] = own
        cls.__getattr__ = lookup
    missed: dict[str, str] = {}
    try:
        yield missed
    finally:
        for cls, own in patched.items():
            if own is None:
                del cls.__getattr__
            else:
                cls.__getattr__ = own
        for key, names in seen.items():
            entry = watched[key]
            first = next((attr for attr in names if hasattr(entry.counterpart, attr)), None)
            if first is not None:
                missed.setdefault(entry.swap, first)


def _trial(model: nn.Module, x: C.Batch, swaps: Swaps, names: list[str]) -> tuple[Exception | None, dict[str, str]]:
    """A forward watching what is looked up on the swapped-in modules of ``names``: the error, if any, and the swaps
    whose originals' attributes were looked up (name -> attribute)."""
    with _missing_lookups(swaps.watched(names)) as missed:
        try:
            run_eval(model, x)
            return None, missed
        except Exception as exc:  # any failure: the model would not run with these swaps
            return exc, missed


def keep_runnable(swaps: Swaps, names: Iterable[str], x: C.Batch, *, traced: bool
                  ) -> list[tuple[str, str | None, str]]:
    """Give back the fewest of the swaps ``names`` (in the order they were made) that keep the model from running
    on ``x``: those whose parent looks up an attribute their original had; when the failure names none, the newest
    first. With a traced model one plain forward confirms it runs; the watched forwards run only if it does not.
    Returns (name, the attribute read or None, the error) of each swap given back."""
    names, given = list(names), []
    if traced and _error(swaps.model, x) is None:
        return given
    while names:
        error, missed = _trial(swaps.model, x, swaps, names)
        if error is None:
            break
        message = f"{type(error).__name__}: {' '.join(str(error).split())}"
        culprits = [(n, missed[n], message) for n in names if n in missed] or [(names[-1], None, message)]
        for name, _, _ in culprits:
            swaps.give_back(name)
            names.remove(name)
        given += culprits
    return given


def _error(model: nn.Module, x: C.Batch) -> Exception | None:
    try:
        run_eval(model, x)
        return None
    except Exception as exc:  # any failure: the trial forwards find out which swap causes it
        return exc


def packed_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of the outermost registered packed layers inside ``model``, each once (not ``model`` itself:
    in-place surgery cannot replace the root; use :func:`~lrd_exp.decompose.registry.unpacked` for that)."""
    inside: list[str] = []
    for name, m in model.named_modules():
        if name and R.packed_type(m) is not None and not any(name.startswith(p + ".") for p in inside):
            inside.append(name)
            yield name, m


def unpack(swaps: Swaps, reads: dict[str, str] | None = None, x: C.Batch | None = None) -> list[str]:
    """Swap every packed layer (torch's attention and transformer layers) for its equivalent, unless the model reads
    one of its attributes itself (``reads``: :func:`traced_reads`, None when the model could not be traced); with
    an input ``x``, those that keep the model from running are put back. Returns the names unpacked."""
    names = []
    for name, m in list(packed_layers(swaps.model)):
        if reads and name in reads:
            log.info("%s stays torch's %s: the model reads .%s of it", name, type(m).__name__, reads[name])
            continue
        swaps.swap(name, R.unpacked(m))
        names.append(name)
    if x is not None and names:
        for name, attr, error in keep_runnable(swaps, names, x, traced=reads is not None):
            why = f"its parent reads .{attr} of it" if attr else f"the model failed with it unpacked ({error})"
            log.info("%s stays torch's %s: %s", name, type(swaps.model.get_submodule(name)).__name__, why)
            names.remove(name)
    return names


def repack(swaps: Swaps, names: Iterable[str]) -> list[str]:
    """Give back the unpacked layers of ``names`` that hold no factorized layer, so a model left dense keeps torch's
    fused paths; returns the names given back."""
    back = [name for name in names if name in swaps.originals
            and not any(isinstance(m, FactorizedLayer) for m in swaps.model.get_submodule(name).modules())]
    for name in back:
        swaps.give_back(name)
    return back
