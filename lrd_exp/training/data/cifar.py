"""CIFAR-10 / CIFAR-100 from their python batch files, fed the model's own input pipeline."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from lrd_exp.config.values import check_choice
from lrd_exp.training.data.base import BaseDataModule, TransformTensorDataset
from lrd_exp.training.data.options import DatasetOptions


class _CIFAR10Files(CIFAR10):
    """torchvision's CIFAR-10 reader on the folder that holds the batch files (``root`` itself, whatever its name),
    checking that the files exist instead of their md5.

    torchvision's checksums reject anything but the official files (a tiny file in the same format, a re-pickled
    copy); the user's files are checked by reading them (a bad pickle or a wrong size fails there). A download
    goes through torchvision's own class, which does check the archive and the files it extracts.
    """

    base_folder = ""
    meta = {**CIFAR10.meta, "md5": None}  # check_integrity(path, md5=None): the file exists

    def _check_integrity(self) -> bool:
        return all(check_integrity(os.path.join(self.root, name)) for name, _ in self.train_list + self.test_list)


class _CIFAR100Files(_CIFAR10Files, CIFAR100):
    """CIFAR-100 read like :class:`_CIFAR10Files` (CIFAR-100's file list, fine labels)."""

    meta = {**CIFAR100.meta, "md5": None}


class CIFARDataModule(BaseDataModule):
    """CIFAR-10/100 read from the python batch files with torchvision (existence checked instead of md5, see
    :class:`_CIFAR10Files`); downloaded by torchvision only when ``dataset.download=true``.

    ``root`` holds ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or is that folder itself). Images stay in memory
    as uint8; val is the official test set. ``augment``: random crop (pad 4) + horizontal flip at the stored 32 px.
    Mean, std and interpolation are the model's; the whole 32 px image is resized to ``image_size`` (crop_pct 1.0
    unless ``dataset.crop_pct`` says otherwise: a CIFAR image is already a tight crop of its object).
    """

    # name: (torchvision's class, which downloads; the reader)
    SOURCES = {
        "cifar10": (CIFAR10, _CIFAR10Files),
        "cifar100": (CIFAR100, _CIFAR100Files),
    }

    def __init__(self, options: DatasetOptions, **kwargs: Any):
        name = self.name = check_choice("dataset.name", options.name, tuple(self.SOURCES))
        super().__init__(options, **kwargs)
        official, self.reader = self.SOURCES[name]
        self.base_folder = official.base_folder
        self.files = [f for f, _ in official.train_list + official.test_list] + [official.meta["filename"]]
        self._fix("num_classes", 10 if name == "cifar10" else 100, self.num_classes)
        self._fix("in_chans", 3, self.in_chans)
        self._use_model_preprocessing(crop_pct=1.0)

    def _folder(self) -> str | None:
        """The folder holding the batch files, or None when they are missing."""
        for folder in (os.path.join(self.root, self.base_folder), self.root):
            if all(os.path.isfile(os.path.join(folder, f)) for f in self.files):
                return folder
        return None

    def _download(self) -> None:
        from torchvision import datasets  # looked up at call time: tests replace the class

        cls = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        try:
            cls(self.root, train=True, download=True)
        except Exception as e:  # network, disk, checksum: report the cause in one line
            raise RuntimeError(
                f"dataset.download: downloading {self.name} to {self.root!r} failed: {type(e).__name__}: {e}"
            ) from e
        if self._folder() is None:
            raise RuntimeError(
                f"dataset.download: downloading {self.name} to {self.root!r} failed: "
                f"the batch files are still missing under {self.root!r}"
            )

    def _ensure_files(self) -> str:
        folder = self._folder()
        if folder is None and self.options.download:
            self._download()
            folder = self._folder()
        if folder is None:
            expected = os.path.join(self.root, self.base_folder)
            missing = [f for f in self.files if not os.path.isfile(os.path.join(expected, f))]
            raise FileNotFoundError(
                f"dataset.root={self.root!r}: {self.name} files not found in {expected!r} "
                f"(missing {', '.join(missing)}); set dataset.download=true or point dataset.root "
                f"at the extracted data"
            )
        return folder

    def prepare_data(self) -> None:
        self._ensure_files()

    def _dataset(self, train: bool) -> Dataset:
        """One split as uint8 (N, 3, 32, 32) in memory, the transform applied per sample (no PIL image per sample,
        as torchvision's ``__getitem__`` would make)."""
        split = self.reader(self._ensure_files(), train=train)
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps H x W x C
        labels = torch.as_tensor(split.targets, dtype=torch.long)
        augment = train and self.options.augment
        shift = [v2.Pad(4, fill=0), v2.RandomCrop(32), v2.RandomHorizontalFlip()] if augment else []
        # timm's eval steps take the float tensor: resize and crop (none at 32 px, crop_pct 1.0), normalise
        transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), *shift, self.preprocessing.eval_transform()])
        return TransformTensorDataset(images, labels, transform)

    def _build_train(self) -> Dataset:
        return self._dataset(train=True)

    def _build_val(self) -> Dataset:
        return self._dataset(train=False)
