"""Training: the LightningModule (classifier), datamodules (data), the model's own input pipeline
(preprocessing), the baseline cache (baseline), the Trainer of a job (trainer), the fine-tuning time to a target
accuracy (target) and the fine-tuning recipe of a calibrated start (recipe)."""

from lrd_exp.training.classifier import Classifier, make_optimizer
from lrd_exp.training.data import build_datamodule

__all__ = ["Classifier", "build_datamodule", "make_optimizer"]
