"""Datamodules: ``digits`` (embedded, offline), ``synthetic``, ``cifar10`` / ``cifar100`` and an ``imagenet`` folder.

Every datamodule knows ``num_classes``, ``in_chans`` and ``image_size`` right after construction, so the model can
be built before any data is read, and offers ``example_batch`` for throughput measurement at the real input shape.
The validation loader is the evaluation split top-1 is reported on (the test set for CIFAR, ``val/`` for ImageNet).
CIFAR and ImageNet folders feed the model the inputs that it expects: its own data config (a
:class:`~lrd_exp.training.preprocessing.Preprocessing`) with the ``dataset.*`` overrides, through timm's transforms.
A datamodule is built from :class:`DatasetOptions` (the ``dataset`` node, typed and checked once), one file per
family of datasets.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lrd_exp.training.data.base import BaseDataModule
from lrd_exp.training.data.cifar import CIFARDataModule
from lrd_exp.training.data.digits import DigitsDataModule
from lrd_exp.training.data.folder import ImageFolderDataModule
from lrd_exp.training.data.options import PREPROCESSING_KEYS, DatasetOptions
from lrd_exp.training.data.synthetic import SyntheticDataModule
from lrd_exp.training.preprocessing import Preprocessing

_DATAMODULES: dict[str, type[BaseDataModule]] = {
    "digits": DigitsDataModule,
    "synthetic": SyntheticDataModule,
    "cifar10": CIFARDataModule,
    "cifar100": CIFARDataModule,
    "imagenet": ImageFolderDataModule,
}
DATASETS = tuple(_DATAMODULES)  # the same names as lrd_exp.config.values.DATASETS (tests/test_training_data.py)

__all__ = ["DATASETS", "PREPROCESSING_KEYS", "BaseDataModule", "CIFARDataModule", "DatasetOptions",
           "DigitsDataModule", "ImageFolderDataModule", "SyntheticDataModule", "build_datamodule"]


def build_datamodule(
    dataset: DatasetOptions | Any, *, batch_size: int, seed: int = 0, data_dir: str = "data",
    preprocessing: Preprocessing | None = None
) -> pl.LightningDataModule:
    """The datamodule for ``dataset.name`` (one of :data:`DATASETS`); ``dataset.root`` None means
    ``data_dir/<name>``.

    ``dataset``: :class:`DatasetOptions`, or the ``dataset`` config node (a DictConfig, a mapping or an object
    with its keys) they are built from, checked there. ``preprocessing``: the model's input pipeline
    (:func:`~lrd_exp.training.preprocessing.model_preprocessing`; None: timm's defaults), which CIFAR and ImageNet
    folders follow and where ``dataset.image_size`` is null, every dataset's size."""
    options = dataset if isinstance(dataset, DatasetOptions) else DatasetOptions.from_config(dataset)
    return _DATAMODULES[options.name](options, batch_size=batch_size, seed=seed, data_dir=data_dir,
                                      preprocessing=preprocessing)
