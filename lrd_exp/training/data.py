"""Datamodules: ``digits`` (embedded, offline), ``synthetic``, ``cifar10`` / ``cifar100`` and an ``imagenet`` folder.

Every datamodule knows ``num_classes``, ``in_chans`` and ``image_size`` right after construction, so the model can
be built before any data is read, and offers ``example_batch`` for throughput measurement at the real input shape.
The validation loader is the evaluation split top-1 is reported on (the test set for CIFAR, ``val/`` for ImageNet).
CIFAR and ImageNet folders feed the model the inputs that it expects: its own data config (a
:class:`~lrd_exp.training.preprocessing.Preprocessing`) with the ``dataset.*`` overrides, through timm's transforms.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from lrd_exp.config.values import check_stats
from lrd_exp.training.preprocessing import Preprocessing, input_columns, model_preprocessing

#: The ``dataset.*`` keys that override the model's input pipeline (image_size overrides its input size).
PREPROCESSING_KEYS = ("image_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a DictConfig, a mapping or a plain object; missing or None gives ``default``."""
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def _stats(value: Any, default: Sequence[float], channels: int, key: str) -> tuple[float, ...]:
    """Per-channel mean/std: ``value`` from the config (1 or ``channels`` numbers) or the dataset's ``default``."""
    return check_stats(f"dataset.{key}", default if value is None else value, channels)


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


class _TransformTensorDataset(TensorDataset):
    """A TensorDataset of (images, labels) whose images pass through a per-sample transform."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
    ):
        super().__init__(images, labels)
        self.transform = transform

    def __getitem__(self, index):
        image, label = super().__getitem__(index)
        return self.transform(image), label


class _BaseDataModule(pl.LightningDataModule):
    """Loaders, lazy setup and ``example_batch`` shared by every dataset; subclasses build the two datasets."""

    name = "base"

    def __init__(self, cfg: Any, *, batch_size: int, seed: int = 0, data_dir: str = "data",
                 preprocessing: Preprocessing | None = None):
        super().__init__()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        # the model's input pipeline (timm's defaults without one); datasets of real photos use all of it
        self.model_preprocessing = preprocessing or model_preprocessing()
        self.preprocessing: Preprocessing | None = None
        self.image_size = int(_opt(cfg, "image_size", self.model_preprocessing.input_size))
        self.in_chans = int(_opt(cfg, "in_chans", 1))
        self.num_classes = int(_opt(cfg, "num_classes", 10))
        self.num_workers = int(_opt(cfg, "num_workers", 0))
        self.augment = bool(_opt(cfg, "augment", False))
        self.download = bool(_opt(cfg, "download", False))
        self.root = str(_opt(cfg, "root", os.path.join(data_dir, self.name)))
        self.cfg_mean = _opt(cfg, "mean")
        self.cfg_std = _opt(cfg, "std")
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def _fix(self, attr: str, value: int, cfg_value: int) -> None:
        """Set a dataset-given attribute; warn when the config asked for something else (the data wins)."""
        if value != cfg_value:
            warnings.warn(
                f"dataset.{attr}={cfg_value} but {self.name} has {attr}={value}; using {value}", stacklevel=3
            )
        setattr(self, attr, value)

    def _use_model_preprocessing(self, cfg: Any, **defaults: Any) -> None:
        """Take the model's input pipeline with the ``dataset.*`` overrides (``defaults``: this dataset's own
        values where the config leaves a key null); ``image_size`` follows it."""
        values = {key: _opt(cfg, key, defaults.get(key)) for key in PREPROCESSING_KEYS}
        self.preprocessing = self.model_preprocessing.override(**values)
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
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            # a last batch of one sample breaks BatchNorm in training mode
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
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


class DigitsDataModule(_BaseDataModule):
    """scikit-learn's 8x8 digits (1797 images, bundled with sklearn): the offline default, trains in seconds on a CPU.

    Split: stratified, seeded by ``seed`` (numpy's legacy RandomState, so the same on every machine). Images are
    scaled to [0, 1], resized (bilinear) to ``image_size`` once and kept in memory as one gray channel; each sample is
    repeated to ``in_chans`` and normalised on the fly (mean/std from the config, else from the train split).
    ``augment`` adds a random shift of up to ``image_size // 8`` pixels (zero pad = background, then crop).
    """

    name = "digits"

    def __init__(self, cfg: Any, **kwargs):
        super().__init__(cfg, **kwargs)
        self.val_fraction = float(_opt(cfg, "val_fraction", 0.2))
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"dataset.val_fraction must be in (0, 1), got {self.val_fraction}")
        self._fix("num_classes", 10, self.num_classes)
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.mean: tuple[float, ...] | None = None
        self.std: tuple[float, ...] | None = None
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None

    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image (resized, in [0, 1]) and label; the seeded stratified split and the training split's statistics
        are drawn on the first call, so both splits share them."""
        if self._data is None:
            data = load_digits()
            labels = torch.as_tensor(data.target, dtype=torch.long)
            images = torch.as_tensor(data.images, dtype=torch.float32).div(16.0).unsqueeze(1)  # N x 1 x 8 x 8
            images = _resize(self.image_size)(images)
            train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=self.val_fraction,
                                                  random_state=self.seed, stratify=data.target)
            self.train_indices, self.val_indices = np.sort(train_idx), np.sort(val_idx)
            train_images = images[self.train_indices]
            self.mean = _stats(self.cfg_mean, [train_images.mean().item()], self.in_chans, "mean")
            self.std = _stats(self.cfg_std, [train_images.std().item()], self.in_chans, "std")
            self._data = (images, labels)
        return self._data

    def _fixed_transform(self) -> v2.Compose:
        return _image_transform(self.mean, self.std, channels=self.in_chans)

    def _build_train(self) -> Dataset:
        images, labels = self._split()
        x, y = images[self.train_indices], labels[self.train_indices]
        if self.augment:
            shift = _image_transform(self.mean, self.std, channels=self.in_chans, pad=max(1, self.image_size // 8),
                                     crop=self.image_size)
            return _TransformTensorDataset(x, y, shift)
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


class SyntheticDataModule(_BaseDataModule):
    """Random N(0, 1) images and uniform labels of any shape/class count: for throughput, not accuracy."""

    name = "synthetic"

    def __init__(self, cfg: Any, **kwargs):
        super().__init__(cfg, **kwargs)
        self.train_size = int(_opt(cfg, "train_size", 512))
        self.val_size = int(_opt(cfg, "val_size", 128))

    @property
    def has_real_data(self) -> bool:
        return False

    def _dataset(self, n: int, offset: int) -> Dataset:
        shape = (self.in_chans, self.image_size, self.image_size)
        return _SyntheticImages(n, shape, self.num_classes, seed=2 * self.seed + offset)

    def _build_train(self) -> Dataset:
        return self._dataset(self.train_size, 0)

    def _build_val(self) -> Dataset:
        return self._dataset(self.val_size, 1)


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


class CIFARDataModule(_BaseDataModule):
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

    def __init__(self, cfg: Any, *, name: str, **kwargs):
        self.name = name
        super().__init__(cfg, **kwargs)
        official, self.reader = self.SOURCES[name]
        self.base_folder = official.base_folder
        self.files = [f for f, _ in official.train_list + official.test_list] + [official.meta["filename"]]
        self._fix("num_classes", 10 if name == "cifar10" else 100, self.num_classes)
        self._fix("in_chans", 3, self.in_chans)
        self._use_model_preprocessing(cfg, crop_pct=1.0)

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
        if folder is None and self.download:
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
        augment = train and self.augment
        shift = [v2.Pad(4, fill=0), v2.RandomCrop(32), v2.RandomHorizontalFlip()] if augment else []
        # timm's eval steps take the float tensor: resize and crop (none at 32 px, crop_pct 1.0), normalise
        transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), *shift, self.preprocessing.eval_transform()])
        return _TransformTensorDataset(images, labels, transform)

    def _build_train(self) -> Dataset:
        return self._dataset(train=True)

    def _build_val(self) -> Dataset:
        return self._dataset(train=False)


class _ClassMapImageFolder(ImageFolder):
    """ImageFolder with a given class-to-index map, so val uses train's indices even if it lacks some classes."""

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs):
        self._class_to_idx = dict(class_to_idx)
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        return sorted(self._class_to_idx, key=self._class_to_idx.get), dict(self._class_to_idx)


class ImageFolderDataModule(_BaseDataModule):
    """An ImageNet-style folder ``root/{train,val}/<class>/<image>`` read with torchvision's ImageFolder.

    Classes are the subfolders of ``train/`` (counted at construction, so ``num_classes`` is known before setup);
    ``val/`` is indexed with the same class-to-index map. The model's own pipeline through timm's transforms:
    resize to ``image_size / crop_pct`` with its interpolation, centre crop, its mean/std; RandomResizedCrop + flip
    for the training split when ``augment``.
    """

    name = "imagenet"

    def __init__(self, cfg: Any, **kwargs):
        super().__init__(cfg, **kwargs)
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
        self._use_model_preprocessing(cfg)

    def _transform(self, train: bool) -> Callable:
        """timm's pipeline for the model's config: the eval one (resize, centre crop), or with ``augment`` its
        training one (RandomResizedCrop + flip) for the training split."""
        return self.preprocessing.train_transform(self.augment) if train else self.preprocessing.eval_transform()

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


_DATAMODULES: dict[str, Callable[..., _BaseDataModule]] = {
    "digits": DigitsDataModule,
    "synthetic": SyntheticDataModule,
    "cifar10": lambda cfg, **kw: CIFARDataModule(cfg, name="cifar10", **kw),
    "cifar100": lambda cfg, **kw: CIFARDataModule(cfg, name="cifar100", **kw),
    "imagenet": ImageFolderDataModule,
}
DATASETS = tuple(_DATAMODULES)  # the same names as lrd_exp.config.values.DATASETS (tests/test_training_data.py)


def build_datamodule(
    cfg: Any, *, batch_size: int, seed: int = 0, data_dir: str = "data", preprocessing: Preprocessing | None = None
) -> pl.LightningDataModule:
    """The datamodule for ``cfg.name`` (one of :data:`DATASETS`); ``cfg.root`` None means ``data_dir/<name>``.

    ``preprocessing``: the model's input pipeline (:func:`~lrd_exp.training.preprocessing.model_preprocessing`;
    None: timm's defaults), which CIFAR and ImageNet folders follow and where ``cfg.image_size`` is null, every
    dataset's size."""
    name = str(_opt(cfg, "name", "digits"))
    if name not in _DATAMODULES:
        raise ValueError(f"dataset.name={name!r} is not supported; allowed values: {', '.join(DATASETS)}")
    return _DATAMODULES[name](cfg, batch_size=batch_size, seed=seed, data_dir=data_dir, preprocessing=preprocessing)
