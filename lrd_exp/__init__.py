"""lrd-exp: low-rank decomposition with rank quantization and sequential freezing (arXiv:2309.03824).

The public API: decompose a model (:func:`decompose_model`, with its :class:`DecompositionReport`), the factorized
layers it builds, the freeze schedule with the Lightning callback that applies it, and the compressed model as a
product: a self-describing file (:func:`save_decomposed`, :func:`load_decomposed`) and its fastest deployed form
(:func:`merge_for_inference`). The names load on first use, so ``python run.py --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from lrd_exp.cli import register as _register_configs

_register_configs()  # a bare Hydra compose of conf/ needs the schemas config.yaml names

#: public name -> the module that defines it
_PUBLIC = {
    "DecompositionReport": "lrd_exp.decompose",
    "FactorizedLayer": "lrd_exp.decompose",
    "SVDConv1x1": "lrd_exp.decompose",
    "SVDLinear": "lrd_exp.decompose",
    "Tucker2Conv": "lrd_exp.decompose",
    "decompose_model": "lrd_exp.decompose",
    "recalibrate_bn": "lrd_exp.decompose",
    "FreezeSchedule": "lrd_exp.freezing",
    "FreezingCallback": "lrd_exp.freezing",
    "load_decomposed": "lrd_exp.deploy",
    "merge_for_inference": "lrd_exp.deploy",
    "save_decomposed": "lrd_exp.deploy",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lrd_exp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
