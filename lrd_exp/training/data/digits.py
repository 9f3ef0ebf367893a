"""scikit-learn's 8x8 digits: the offline default, kept in memory, normalised by its training split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import v2

from lrd_exp.config.values import check_stats
from lrd_exp.training.data.base import BaseDataModule, TransformTensorDataset
from lrd_exp.training.data.options import DatasetOptions
from lrd_exp.training.preprocessing import input_columns


def _resize(size: int) -> v2.Resize:
    """Bilinear resize of (..., H, W) float tensors to ``size`` x ``size``.

    Antialiased, which matters when shrinking.
    """
    return v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def _repeat_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """One gray channel repeated to ``channels`` (a view: normalising makes the copy)."""
    return x if x.shape[-3] == channels else x.expand(*x.shape[:-3], channels, *x.shape[-2:])


def _image_transform(
    mean: Sequence[float], std: Sequence[float], *, channels: int, pad: int = 0, crop: int | None = None
) -> v2.Compose:
    """Digits' per-sample pipeline on (C, H, W) tensors: to float in [0, 1], random shift (zero ``pad``, random
    ``crop`` back to the stored size), gray repeated to ``channels``, normalise.

    On plain tensors, so the in-memory images need no PIL round trip; the random numbers come from torch's global
    generator, which Lightning's ``seed_everything(workers=True)`` seeds in every worker. Without the random steps
    it also takes a whole (N, C, H, W) batch.
    """
    steps: list[Callable] = [v2.ToDtype(torch.float32, scale=True)]  # uint8 / 255; float passes unchanged
    if pad:
        steps += [v2.Pad(pad, fill=0), v2.RandomCrop(crop)]
    steps.append(v2.Lambda(partial(_repeat_channels, channels=channels)))  # partial pickles into workers
    steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


class DigitsDataModule(BaseDataModule):
    """scikit-learn's 8x8 digits (1797 images, bundled with sklearn): the offline default, trains in seconds on a CPU.

    Split: stratified, seeded by ``seed`` (numpy's legacy RandomState, so the same on every machine). Images are
    scaled to [0, 1], resized (bilinear) to ``image_size`` once and kept in memory as one gray channel; each sample is
    repeated to ``in_chans`` and normalised on the fly (mean/std from the config, else from the train split).
    ``augment`` adds a random shift of up to ``image_size // 8`` pixels (zero pad = background, then crop).
    """

    name = "digits"

    def __init__(self, options: DatasetOptions, **kwargs: Any):
        super().__init__(options, **kwargs)
        self._fix("num_classes", 10, self.num_classes)
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    def _stats(self, key: str, measured: float) -> tuple[float, ...]:
        """Per-channel mean/std: the config's (1 or ``in_chans`` numbers), else the training split's ``measured``."""
        given = getattr(self.options, key)
        return check_stats(f"dataset.{key}", [measured] if given is None else given, self.in_chans)

    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image (resized, in [0, 1]) and label; the seeded stratified split and the training split's statistics
        are drawn on the first call, so both splits share them."""
        if self._data is None:
            data = load_digits()
            labels = torch.as_tensor(data.target, dtype=torch.long)
            images = torch.as_tensor(data.images, dtype=torch.float32).div(16.0).unsqueeze(1)  # N x 1 x 8 x 8
            images = _resize(self.image_size)(images)
            train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=self.options.val_fraction,
                                                  random_state=self.seed, stratify=data.target)
            self.train_indices, self.val_indices = np.sort(train_idx), np.sort(val_idx)
            train_images = images[self.train_indices]
            self.mean = self._stats("mean", train_images.mean().item())
            self.std = self._stats("std", train_images.std().item())
            self._data = (images, labels)
        return self._data

    def _fixed_transform(self) -> v2.Compose:
        return _image_transform(self.mean, self.std, channels=self.in_chans)

    def _build_train(self) -> Dataset:
        images, labels = self._split()
        x, y = images[self.train_indices], labels[self.train_indices]
        if self.options.augment:
            shift = _image_transform(self.mean, self.std, channels=self.in_chans, pad=max(1, self.image_size // 8),
                                     crop=self.image_size)
            return TransformTensorDataset(x, y, shift)
        # without augmentation the transform is fixed: applied once to the whole split, so a batch is a slice (the
        # loader adds no per-sample Python work to the measured training loop)
        return TensorDataset(self._fixed_transform()(x).contiguous(), y)

    def _build_val(self) -> Dataset:
        images, labels = self._split()
        return TensorDataset(self._fixed_transform()(images[self.val_indices]).contiguous(), labels[self.val_indices])

    def input_columns(self) -> dict[str, Any]:
        """The 8x8 images resized whole (bilinear) and normalised by the training split's statistics (or the
        config's): known once the split is drawn."""
        self._split()
        return input_columns(self.image_size, mean=self.mean, std=self.std, crop_pct=1.0, crop_mode="squash",
                             interpolation="bilinear")
