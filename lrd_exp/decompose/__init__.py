"""Low-rank decomposition: the linear algebra (functional), the layer types it knows (registry: linear-like types
it factorizes as linears, nn.Linear, transformers' Conv1D, your own; packed types it unpacks first; parents that
read a child's weight), factorized layers (layers), torch's attention and transformer layers unpacked so their
projections factorize (attention), keeping the model runnable through the surgery (runnable), watching layers in a
forward (capture), calibration inputs (calibration), rank formulas (ranks), each policy's ranks (policies), one
candidate layer (plan), measured ranks (search: the ranks it times (candidates), each layer timed alone
(layer_timing), the timings' CSV (rank_timings)), one budget shared by the layers (budget), each layer's damage
when it alone is cut, measured or estimated (damage), ranks spread over the whole model under one budget
(allocation), the measurements kept on disk (cache), model surgery (surgery), what it did (report) and whether the
model survived it (check: the end-to-end check against the original). Needs torch alone: no Hydra, OmegaConf,
pandas or Lightning."""

from lrd_exp.decompose.attention import (
    FactorizableDecoderLayer,
    FactorizableEncoderLayer,
    FactorizableMultiheadAttention,
)
from lrd_exp.decompose.calibration import recalibrate_bn
from lrd_exp.decompose.check import DecompositionWarning, OutputCheck
from lrd_exp.decompose.layers import FactorizedLayer, SVDConv1x1, SVDLinear, Tucker2Conv, reconstruct_weight
from lrd_exp.decompose.registry import (
    LinearType,
    is_linear,
    register_linear,
    register_unpacked,
    register_weight_reader,
)
from lrd_exp.decompose.report import DecompositionReport, LayerReport
from lrd_exp.decompose.surgery import decompose_model, find_candidates

__all__ = [
    "DecompositionReport",
    "DecompositionWarning",
    "FactorizableDecoderLayer",
    "FactorizableEncoderLayer",
    "FactorizableMultiheadAttention",
    "FactorizedLayer",
    "LayerReport",
    "OutputCheck",
    "LinearType",
    "SVDConv1x1",
    "SVDLinear",
    "Tucker2Conv",
    "decompose_model",
    "find_candidates",
    "is_linear",
    "recalibrate_bn",
    "reconstruct_weight",
    "register_linear",
    "register_unpacked",
    "register_weight_reader",
]
