"""What every datamodule shares: its shape known on construction, lazy setup, seeded loaders, the calibration and
check images drawn from the training split, and ``example_batch`` for throughput measurement."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lrd_exp.training.data.options import DatasetOptions
from lrd_exp.training.preprocessing import Preprocessing, input_columns, model_preprocessing


class TransformTensorDataset(TensorDataset):
    """A TensorDataset of (images, labels) whose images pass through a per-sample transform."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
    ):
        super().__init__(images, labels)
        self.transform = transform

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return self.transform(image), label


class BaseDataModule(pl.LightningDataModule):
    """Loaders, lazy setup and ``example_batch`` shared by every dataset; subclasses build the two datasets."""

    name = "base"

    def __init__(self, options: DatasetOptions, *, batch_size: int, seed: int = 0, data_dir: str = "data",
                 preprocessing: Preprocessing | None = None):
        super().__init__()
        self.options = options
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        # the model's input pipeline (timm's defaults without one); datasets of real photos use all of it
        self.model_preprocessing = preprocessing or model_preprocessing()
        self.preprocessing: Preprocessing | None = None
        size = options.image_size
        self.image_size = int(self.model_preprocessing.input_size if size is None else size)
        self.in_chans = options.in_chans
        self.num_classes = options.num_classes
        self.root = os.path.join(data_dir, self.name) if options.root is None else options.root
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def _fix(self, attr: str, value: int, cfg_value: int) -> None:
        """Set a dataset-given attribute; warn when the config asked for something else (the data wins)."""
        if value != cfg_value:
            warnings.warn(
                f"dataset.{attr}={cfg_value} but {self.name} has {attr}={value}; using {value}", stacklevel=3
            )
        setattr(self, attr, value)

    def _use_model_preprocessing(self, **defaults: Any) -> None:
        """Take the model's input pipeline with the ``dataset.*`` overrides (``defaults``: this dataset's own
        values where the config leaves a key null); ``image_size`` follows it."""
        self.preprocessing = self.model_preprocessing.override(**self.options.preprocessing_overrides(**defaults))
        self.image_size = self.preprocessing.input_size

    def input_columns(self) -> dict[str, Any]:
        """The row's record of the inputs the model is fed (``input_size``, ``input_mean``, ...)."""
        if self.preprocessing is not None:
            return self.preprocessing.columns()
        return input_columns(self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.val_dataset is None:
            self.val_dataset = self._build_val()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build_train()

    def _build_train(self) -> Dataset:
        raise NotImplementedError

    def _build_val(self) -> Dataset:
        raise NotImplementedError

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        kwargs: dict[str, Any] = {}
        if train:
            # seeded shuffle: the same seed gives the same order of batches
            kwargs["generator"] = torch.Generator().manual_seed(self.seed)
        workers = self.options.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # a last batch of one sample breaks BatchNorm in training mode
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @property
    def has_real_data(self) -> bool:
        """Whether the images mean something (calibration fits to them; synthetic noise would only mislead it)."""
        return True

    def calibration_batches(self, n: int, batch_size: int | None = None) -> list[torch.Tensor]:
        """``n`` images of the training split (never validation), chosen by a generator seeded with the run's seed,
        in batches: the inputs a decomposition is fitted to and BatchNorm re-estimated on. Their indices into the
        training split are kept in ``calibration_indices``."""
        total = self._train_size()
        if not 1 <= n <= total:
            raise ValueError(f"rank.calibration_images={n} is not allowed here: between 1 and the training split's "
                             f"{total} images")
        self.calibration_indices = self._training_order()[:n].sort().values
        return self._batches(self.calibration_indices, batch_size)

    def held_out_batches(self, n: int, skip: int, batch_size: int | None = None) -> list[torch.Tensor]:
        """Up to ``n`` further training images, after the first ``skip`` of the same seeded order (the calibration
        images): inputs the fit did not see, for the end-to-end check. Empty when the split has none left."""
        order = self._training_order()[skip:skip + n]
        return self._batches(order.sort().values, batch_size) if len(order) else []

    def _train_size(self) -> int:
        if self.train_dataset is None:
            self.setup("fit")
        return len(self.train_dataset)

    def _training_order(self) -> torch.Tensor:
        """The training split's indices in the run's seeded order: calibration takes the first, the check the next."""
        return torch.randperm(self._train_size(), generator=torch.Generator().manual_seed(self.seed))

    def _batches(self, indices: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
        size = int(batch_size or self.batch_size)
        images = [self.train_dataset[int(i)][0] for i in indices]
        return [torch.stack(images[i:i + size]) for i in range(0, len(images), size)]

    def example_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded random batch of the real input shape, for throughput measurement (reads no data)."""
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(batch_size, self.in_chans, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (batch_size,), generator=g)
        return x, y
