"""An ImageNet-style folder (``root/{train,val}/<class>/<image>``), fed the model's own input pipeline."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from lrd_exp.training.data.base import BaseDataModule
from lrd_exp.training.data.options import DatasetOptions


class _ClassMapImageFolder(ImageFolder):
    """ImageFolder with a given class-to-index map, so val uses train's indices even if it lacks some classes."""

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs):
        self._class_to_idx = dict(class_to_idx)
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        return sorted(self._class_to_idx, key=self._class_to_idx.get), dict(self._class_to_idx)


class ImageFolderDataModule(BaseDataModule):
    """An ImageNet-style folder ``root/{train,val}/<class>/<image>`` read with torchvision's ImageFolder.

    Classes are the subfolders of ``train/`` (counted at construction, so ``num_classes`` is known before setup);
    ``val/`` is indexed with the same class-to-index map. The model's own pipeline through timm's transforms:
    resize to ``image_size / crop_pct`` with its interpolation, centre crop, its mean/std; RandomResizedCrop + flip
    for the training split when ``augment``.
    """

    name = "imagenet"

    def __init__(self, options: DatasetOptions, **kwargs: Any):
        super().__init__(options, **kwargs)
        from torchvision.datasets.folder import find_classes

        layout = "an ImageFolder layout <root>/train/<class>/<image> and <root>/val/<class>/<image>"
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"dataset.root={self.root!r}: folder not found; expected {layout} (it cannot be downloaded)"
            )
        for split in ("train", "val"):
            path = os.path.join(self.root, split)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"dataset.root={self.root!r}: {path!r} not found; expected {layout}")
            if not any(entry.is_dir() for entry in os.scandir(path)):
                raise FileNotFoundError(
                    f"dataset.root={self.root!r}: {path!r} has no class subfolders; expected {layout}"
                )
        self.classes, self.class_to_idx = find_classes(os.path.join(self.root, "train"))
        self._fix("num_classes", len(self.classes), self.num_classes)
        self._fix("in_chans", 3, self.in_chans)
        self._use_model_preprocessing()

    def _transform(self, train: bool) -> Callable:
        """timm's pipeline for the model's config: the eval one (resize, centre crop), or with ``augment`` its
        training one (RandomResizedCrop + flip) for the training split."""
        if not train:
            return self.preprocessing.eval_transform()
        return self.preprocessing.train_transform(self.options.augment)

    def _folder(self, split: str) -> Dataset:
        return _ClassMapImageFolder(
            os.path.join(self.root, split),
            self.class_to_idx,
            transform=self._transform(split == "train"),
            allow_empty=split == "val",
        )

    def _build_train(self) -> Dataset:
        return self._folder("train")

    def _build_val(self) -> Dataset:
        return self._folder("val")
