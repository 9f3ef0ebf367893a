"""The compressed model as a product: a self-describing file (model_file), the fastest form of each layer for
inference (merge), and export to ``torch.export`` / ONNX (export)."""

from lrd_exp.deploy.merge import MergeReport, merge_for_inference, merged_layer
from lrd_exp.deploy.model_file import ModelFileError, load_decomposed, save_decomposed

__all__ = ["MergeReport", "ModelFileError", "load_decomposed", "merge_for_inference", "merged_layer",
           "save_decomposed"]
