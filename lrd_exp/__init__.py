"""lrd-exp: low-rank decomposition with rank quantization and sequential freezing (arXiv:2309.03824).

The public API: decompose a model (:func:`decompose_model`, with its :class:`DecompositionReport`), the factorized
layers it builds, the freeze schedule with the Lightning callback that applies it, and the compressed model as a
product: a self-describing file (:func:`save_decomposed`, :func:`load_decomposed`) and its fastest deployed form
(:func:`merge_for_inference`).
"""

from lrd_exp.cli import register as _register_configs
from lrd_exp.decompose import (
    DecompositionReport,
    FactorizedLayer,
    SVDConv1x1,
    SVDLinear,
    Tucker2Conv,
    decompose_model,
)
from lrd_exp.deploy import load_decomposed, merge_for_inference, save_decomposed
from lrd_exp.freezing import FreezeSchedule, FreezingCallback

_register_configs()  # a bare Hydra compose of conf/ needs the schemas config.yaml names

__all__ = [
    "DecompositionReport",
    "FactorizedLayer",
    "FreezeSchedule",
    "FreezingCallback",
    "SVDConv1x1",
    "SVDLinear",
    "Tucker2Conv",
    "decompose_model",
    "load_decomposed",
    "merge_for_inference",
    "save_decomposed",
]
__version__ = "0.1.0"
