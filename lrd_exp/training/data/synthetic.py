"""Random images and labels of any shape and class count: for throughput, not accuracy."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lrd_exp.training.data.base import BaseDataModule


class _SyntheticImages(Dataset):
    """Random images generated per index from a seeded generator: deterministic, and no memory at any size."""

    def __init__(self, n: int, shape: tuple[int, int, int], num_classes: int, seed: int):
        self.shape, self.seed = shape, seed
        self.labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        return torch.randn(self.shape, generator=g), self.labels[index]


class SyntheticDataModule(BaseDataModule):
    """Random N(0, 1) images and uniform labels of any shape/class count: for throughput, not accuracy."""

    name = "synthetic"

    @property
    def has_real_data(self) -> bool:
        return False

    def _dataset(self, n: int, offset: int) -> Dataset:
        shape = (self.in_chans, self.image_size, self.image_size)
        return _SyntheticImages(n, shape, self.num_classes, seed=2 * self.seed + offset)

    def _build_train(self) -> Dataset:
        return self._dataset(self.options.train_size, 0)

    def _build_val(self) -> Dataset:
        return self._dataset(self.options.val_size, 1)
