"""The compressed model as a file a user keeps: which layers were split, at which ranks, and the weights.

A decomposed model's architecture is not in any timm config, so a plain state_dict cannot be loaded again. This
file is self-describing: the model's timm name and creation arguments, every factorized layer's kind and ranks,
the weights, and whatever the caller adds (the rank config, the result row's identity). It holds plain data and
tensors only, so it loads with ``torch.load(weights_only=True)``: opening a colleague's file runs no code.
Loading rebuilds the exact module from the structure (no SVD) and copies the weights: outputs are identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lrd_exp.decompose.attention import UNPACKED, Unpacked
from lrd_exp.decompose.layers import FactorizedLayer, SVDConv1x1, SVDLinear, Tucker2Conv
from lrd_exp.decompose.registry import UNPACKED_FROM, is_linear, packed_type, unpacked
from lrd_exp.results.io import write_torch_atomic

FORMAT = "lrd-exp/decomposed-model"
VERSION = 1
#: factorized layer class -> (the layer type it replaces, how to rebuild it from that layer and its ranks); an
#: SVDLinear replaces any registered linear-like type (:mod:`lrd_exp.decompose.registry`)
KINDS: dict[str, tuple[type[nn.Module], Any]] = {
    "SVDLinear": (nn.Linear, SVDLinear.like),
    "SVDConv1x1": (nn.Conv2d, SVDConv1x1.like),
    "Tucker2Conv": (nn.Conv2d, Tucker2Conv.like),
    # torch's attention / transformer layers, unpacked so their projections could be factorized (no ranks)
    **{cls.__name__: (torch_cls, cls.from_torch) for torch_cls, cls in UNPACKED.items()},
}


class ModelFileError(ValueError):
    """A model file that cannot be used here: printed as one line (a newer format, a truncated file, a structure
    that does not fit the model)."""


def _plain(value: Any) -> Any:
    """Plain data only (what ``weights_only`` loads): JSON types; anything else becomes its string."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def structure(model: nn.Module) -> list[dict[str, Any]]:
    """Every factorized layer of ``model`` (name, class, ranks) and every unpacked layer (torch's attention /
    transformer layers, or a type registered with ``register_unpacked``; no ranks), in module order: an unpacked
    layer comes before the factorized projections inside it."""
    return [{"name": name, "kind": type(m).__name__,
             "ranks": [int(r) for r in m.ranks] if isinstance(m, FactorizedLayer) else []}
            for name, m in model.named_modules()
            if isinstance(m, (FactorizedLayer, Unpacked)) or hasattr(m, UNPACKED_FROM)]


def timm_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def save_decomposed(model: nn.Module, path: str | os.PathLike[str], *, model_name: str | None = None,
                    model_kwargs: dict[str, Any] | None = None, **meta: Any) -> Path:
    """Write ``model`` (decomposed, possibly partly merged) as a self-describing file, atomically.

    ``model_name`` / ``model_kwargs``: how to build the original with ``timm.create_model`` (the name defaults to
    timm's ``pretrained_cfg["architecture"]``; a model that is not in timm leaves it None and is loaded onto a
    freshly built original with ``load_decomposed(path, model=...)``). Any other keyword (e.g. ``rank=``,
    ``row=``) is stored as plain data under ``meta``.
    """
    path = Path(path)
    payload = {
        "format": FORMAT, "version": VERSION,
        "model": {"name": model_name or timm_name(model), "kwargs": _plain(model_kwargs or {})},
        "layers": structure(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": _plain(meta),
        "torch": str(torch.__version__),
    }
    return write_torch_atomic(path, payload)


def read_model_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's contents, checked; :class:`ModelFileError` with one line when it cannot be used."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"model file {os.fspath(path)!r} does not exist") from None
    except Exception as exc:  # truncated, not a torch file, or pickled code weights_only refuses
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFileError(f"model file {os.fspath(path)!r} cannot be read: truncated, not a torch file, or it "
                             f"holds pickled objects ({type(exc).__name__}: {first})") from None
    if not is_model_payload(payload):
        raise ModelFileError(f"{os.fspath(path)!r} is not an lrd-exp model file (no format {FORMAT!r}): write one "
                             "with lrd_exp.save_decomposed, or pass a state_dict / Lightning checkpoint instead")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ModelFileError(f"model file {os.fspath(path)!r} has format version {version!r}, written by a newer "
                             f"lrd-exp; this one reads versions up to {VERSION}: upgrade lrd-exp")
    return payload


def is_model_payload(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def is_model_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an lrd-exp model file (False for a state_dict, a Lightning checkpoint or garbage)."""
    try:
        return is_model_payload(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:
        return False


def apply_structure(model: nn.Module, layers: list[dict[str, Any]], *, source: str = "the model file") -> nn.Module:
    """Swap the named layers of a freshly built original for factorized shells of the saved ranks (no SVD), after
    unpacking the attention / transformer layers the file names."""
    for entry in layers:
        name, kind, ranks = entry.get("name"), entry.get("kind"), entry.get("ranks") or []
        if kind not in KINDS:
            if _unpack_registered(model, name, kind):
                continue
            raise ModelFileError(f"{source}: layer {name!r} has kind {kind!r}; this lrd-exp knows "
                                 f"{', '.join(KINDS)} and the unpacked forms of registered packed types "
                                 "(register_unpacked before loading)")
        replaced, like = KINDS[kind]
        try:
            layer = model.get_submodule(name) if name else model
        except AttributeError:
            layer = None
        if type(layer).__name__ == kind and isinstance(layer, Unpacked):
            continue  # unpacked with the layer around it
        if not name:
            raise ModelFileError(f"{source} holds a model whose root is a {kind}: loading in place cannot replace "
                                 "the root; save and load a module that contains it")
        fits = is_linear(layer) if replaced is nn.Linear else isinstance(layer, replaced)
        if not fits or (kind == "SVDConv1x1" and layer.kernel_size != (1, 1)):
            found = "no such layer" if layer is None else type(layer).__name__
            built = "a linear-like layer" if replaced is nn.Linear else f"an nn.{replaced.__name__}"
            raise ModelFileError(f"{source} does not fit this model: layer {name!r} is {found}, the file holds a "
                                 f"{kind} built from {built}")
        model.set_submodule(name, like(layer, *ranks))
    return model


def _unpack_registered(model: nn.Module, name: str, kind: str) -> bool:
    """Unpack the layer at ``name`` if its type is registered as packed and unpacks to ``kind``; whether it did."""
    try:
        layer = model.get_submodule(name) if name else None
    except AttributeError:
        return False
    if layer is None or packed_type(layer) is None:
        return False
    new = unpacked(layer)
    if type(new).__name__ != kind:
        return False
    model.set_submodule(name, new)
    return True


def load_decomposed(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """The saved model, rebuilt without any SVD and with the saved weights (identical outputs), in eval mode.

    ``model``: your own freshly built original (e.g. a model that is not in timm); the saved structure is applied
    to it in place. Without it the original is built with ``timm.create_model`` from the file's name and arguments.
    """
    payload = read_model_file(path)
    if model is None:
        spec = payload.get("model") or {}
        if not spec.get("name"):
            raise ModelFileError(f"model file {os.fspath(path)!r} names no timm model: build the original yourself "
                                 "and pass it as load_decomposed(path, model=...)")
        model = timm.create_model(spec["name"], pretrained=False, **(spec.get("kwargs") or {}))
    apply_structure(model, payload["layers"], source=f"model file {os.fspath(path)!r}")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelFileError(f"model file {os.fspath(path)!r} does not fit this model: {first}") from None
    return model.eval()
