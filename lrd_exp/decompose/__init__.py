"""Low-rank decomposition: the linear algebra (functional), the linear-like layer types it factorizes as linears
(registry: nn.Linear, transformers' Conv1D, your own), factorized layers (layers), torch's attention and
transformer layers unpacked so their projections factorize (attention), watching layers in a forward (capture),
calibration inputs (calibration), rank formulas (ranks), one candidate layer (plan), measured ranks (search: the
ranks it times (candidates), each layer timed alone (layer_timing), the timings' CSV (rank_timings)), one budget
shared by the layers (budget), ranks spread over the whole model by measured damage under one budget (allocation),
the measurements kept on disk (cache), model surgery (surgery), what it did (report) and whether the model
survived it (check: the end-to-end check against the original). Needs torch alone: no Hydra, OmegaConf, pandas
or Lightning."""

from lrd_exp.decompose.attention import (
    FactorizableDecoderLayer,
    FactorizableEncoderLayer,
    FactorizableMultiheadAttention,
)
from lrd_exp.decompose.calibration import recalibrate_bn
from lrd_exp.decompose.check import DecompositionWarning, OutputCheck
from lrd_exp.decompose.layers import FactorizedLayer, SVDConv1x1, SVDLinear, Tucker2Conv, reconstruct_weight
from lrd_exp.decompose.registry import LinearType, is_linear, register_linear
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
]
