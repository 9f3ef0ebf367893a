"""The ``dataset`` node as the datamodules read it: typed, plain values, checked once when it is built."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from lrd_exp.config.values import check_dataset, enum_value

#: The ``dataset.*`` keys that override the model's input pipeline (image_size overrides its input size).
PREPROCESSING_KEYS = ("image_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def _stats(value: Any) -> Any:
    """``dataset.mean`` / ``std`` as a tuple (one number stays one: :func:`check_stats` checks it per channel)."""
    return tuple(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes)) else value


def _choice(value: Any) -> str:
    return str(enum_value(value))


# key -> (how a given value is read, what the key holds: the error names it)
_READERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "name": (str, "a dataset name"),
    "root": (str, "a folder"),
    "download": (bool, "true or false"),
    "image_size": (int, "null (the model's) or an image size in pixels"),
    "in_chans": (int, "a number of input channels"),
    "num_classes": (int, "a number of classes"),
    "val_fraction": (float, "a fraction in (0, 1)"),
    "train_size": (int, "a number of images"),
    "val_size": (int, "a number of images"),
    "augment": (bool, "true or false"),
    "num_workers": (int, "a number of loader processes"),
    "mean": (_stats, "null (the model's) or 1 or in_chans numbers"),
    "std": (_stats, "null (the model's) or 1 or in_chans numbers > 0"),
    "crop_pct": (float, "null (the model's) or a fraction in (0, 1]"),
    "crop_mode": (_choice, "a crop mode"),
    "interpolation": (_choice, "an interpolation"),
}


@dataclass(frozen=True)
class DatasetOptions:
    """What a datamodule is built from: the ``dataset`` node's keys (:class:`~lrd_exp.config.schema.DatasetConfig`)
    as plain values. A null key takes the default here; ``image_size`` and ``root`` stay None until the datamodule
    resolves them (the model's input size, ``<data_dir>/<name>``), the input-pipeline keys until the model's
    pipeline fills them. Checked on construction: one ValueError naming the key, the value and what is allowed."""

    name: str = "digits"
    root: str | None = None
    download: bool = False
    image_size: int | None = None
    in_chans: int = 1
    num_classes: int = 10
    val_fraction: float = 0.2  # digits: the validation split's share
    train_size: int = 512  # synthetic only
    val_size: int = 128  # synthetic only
    augment: bool = False
    num_workers: int = 0
    mean: tuple[float, ...] | float | None = None
    std: tuple[float, ...] | float | None = None
    crop_pct: float | None = None
    crop_mode: str | None = None
    interpolation: str | None = None

    def __post_init__(self) -> None:
        check_dataset(name=self.name, in_chans=self.in_chans, num_classes=self.num_classes,
                      val_fraction=self.val_fraction)

    @classmethod
    def from_config(cls, node: Any) -> DatasetOptions:
        """From ``cfg.dataset``: a DictConfig, a mapping or an object with these attributes; a missing or null key
        takes the default, a key of another node is not read."""
        given = {}
        for f in fields(cls):
            value = node.get(f.name) if isinstance(node, Mapping) else getattr(node, f.name, None)
            if value is not None:
                read, what = _READERS[f.name]
                try:
                    given[f.name] = read(value)
                except (TypeError, ValueError):
                    raise ValueError(f"dataset.{f.name}={value!r} is not allowed: {what}") from None
        return cls(**given)

    def preprocessing_overrides(self, **defaults: Any) -> dict[str, Any]:
        """The input-pipeline keys (None: the model's), with this dataset's ``defaults`` where the node is null."""
        return {key: defaults.get(key) if getattr(self, key) is None else getattr(self, key)
                for key in PREPROCESSING_KEYS}
