"""lrd-exp: low-rank decomposition with rank quantization and sequential freezing (arXiv:2309.03824)."""

from lrd_exp.decompose import DecompositionReport, decompose_model
from lrd_exp.entry import register as _register_configs

_register_configs()  # a bare Hydra compose of conf/ needs the schemas config.yaml names

__all__ = ["DecompositionReport", "decompose_model"]
__version__ = "0.1.0"
