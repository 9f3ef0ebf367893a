"""lrd-exp: low-rank decomposition with rank quantization and sequential freezing (arXiv:2309.03824)."""

from lrd_exp.decompose import DecompositionReport, decompose_model

__all__ = ["DecompositionReport", "decompose_model"]
__version__ = "0.1.0"
