"""The model's own input pipeline: size, mean, std, crop and interpolation from its timm data config.

A pretrained model scores right only on the inputs that it was trained on: timm's ``resnet50`` default weights
expect a 0.95 bicubic crop, ``vit_base_patch16_224`` mean = std = 0.5 and a 0.9 crop, torchvision's originals
(``resnet50.tv_in1k``) a 0.875 bilinear crop. :func:`model_preprocessing` reads them from a model, or from a timm
name (a tag such as ``resnet50.tv_in1k`` included) without building it; ``dataset.*`` keys override each field
(:meth:`Preprocessing.override`); the transforms are timm's own (``timm.data.create_transform``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from torch import nn

from lrd_exp.config.values import check_preprocessing
from lrd_exp.results.row import INPUT_COLUMNS


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What a model expects of an image: a square ``input_size``, per-channel ``mean`` / ``std`` of the [0, 1]
    pixels, and the eval crop (resize to ``input_size / crop_pct`` with ``interpolation``, then crop)."""

    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    crop_mode: str
    interpolation: str

    @classmethod
    def from_data_config(cls, config: Mapping[str, Any]) -> Preprocessing:
        """From a timm data config (``resolve_data_config``'s dict)."""
        _, height, width = config["input_size"]
        if height != width:
            raise ValueError(f"the model's input size is {height}x{width}; only square inputs are supported: set "
                             "dataset.image_size")
        return cls(int(height), tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]),
                   float(config["crop_pct"]), str(config.get("crop_mode") or "center"), str(config["interpolation"]))

    def override(self, *, image_size: Any = None, mean: Any = None, std: Any = None, crop_pct: Any = None,
                 crop_mode: Any = None, interpolation: Any = None) -> Preprocessing:
        """These fields with the ``dataset.*`` values that are not None (checked: one ValueError naming the key)."""
        checked = check_preprocessing(image_size=image_size, mean=mean, std=std, crop_pct=crop_pct,
                                      crop_mode=crop_mode, interpolation=interpolation, channels=len(self.mean))
        checked["input_size"] = checked.pop("image_size")
        return dataclasses.replace(self, **{k: v for k, v in checked.items() if v is not None})

    def timm_config(self) -> dict[str, Any]:
        """The keywords of ``timm.data.create_transform``."""
        return {"input_size": (len(self.mean), self.input_size, self.input_size), "mean": self.mean, "std": self.std,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode, "interpolation": self.interpolation}

    def eval_transform(self) -> Callable:
        """timm's eval pipeline: resize, crop, to tensor, normalise (PIL images or (C, H, W) float tensors)."""
        return create_transform(**self.timm_config(), is_training=False)

    def train_transform(self, augment: bool) -> Callable:
        """``augment``: timm's training pipeline without colour jitter (RandomResizedCrop with the model's
        interpolation, horizontal flip, normalise); else the eval pipeline."""
        if not augment:
            return self.eval_transform()
        return create_transform(**self.timm_config(), is_training=True, color_jitter=None)

    def columns(self) -> dict[str, Any]:
        """The row's ``input_*`` columns."""
        return input_columns(self.input_size, mean=self.mean, std=self.std, crop_pct=self.crop_pct,
                             crop_mode=self.crop_mode, interpolation=self.interpolation)


def input_columns(size: int, *, mean: Any = None, std: Any = None, crop_pct: float | None = None,
                  crop_mode: str | None = None, interpolation: str | None = None) -> dict[str, Any]:
    """The row's record of the input pipeline (mean / std as JSON lists, rounded to 6 digits; None: not used)."""
    def stats(values: Any) -> str | None:
        return None if values is None else json.dumps([round(float(v), 6) for v in values])

    return dict(zip(INPUT_COLUMNS, (int(size), stats(mean), stats(std), crop_pct, crop_mode, interpolation)))


def model_preprocessing(model: nn.Module | str | None = None, *, image_size: int | None = None) -> Preprocessing:
    """The input pipeline that ``model`` expects: its timm data config (a model's ``pretrained_cfg``, or a timm
    name's, ``resnet50.tv_in1k`` style tags included, read without building the model); a model without one, or
    None, gets timm's defaults. ``image_size``: the size the model is built for (``model.image_size``)."""
    if isinstance(model, str):
        pretrained = get_pretrained_cfg(model)  # an unknown tag raises; an architecture without configs gives None
        config = resolve_data_config({"in_chans": 3}, pretrained_cfg=pretrained.to_dict() if pretrained else None)
    else:
        config = resolve_data_config({"in_chans": 3}, model=model)
    return Preprocessing.from_data_config(config).override(image_size=image_size)
