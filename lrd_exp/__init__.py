"""lrd-exp: low-rank decomposition with rank quantization and sequential freezing (arXiv:2309.03824).

The public API: decompose a model (:func:`decompose_model`, with its :class:`DecompositionReport`), the factorized
layers it builds, and the freeze schedule with the Lightning callback that applies it.
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
]
__version__ = "0.1.0"
