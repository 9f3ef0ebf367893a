"""The run's model: the timm model of ``cfg.model`` for the dataset's shape, with ``model.checkpoint``'s weights,
or the decomposed model of an lrd-exp model file; and the run's data, fed the inputs that this model expects."""

from __future__ import annotations

from typing import Any

import timm
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrd_exp.config.validate import ConfigError
from lrd_exp.deploy import model_file
from lrd_exp.tasks.checkpoint import is_model_file, load_checkpoint
from lrd_exp.training.data import build_datamodule
from lrd_exp.training.preprocessing import model_preprocessing


def data_shape(data: Any) -> dict[str, int]:
    """The model's shape keywords from a datamodule or ``cfg.dataset`` (classes, input channels, image size)."""
    return {"num_classes": data.num_classes, "in_chans": data.in_chans, "image_size": data.image_size}


def build_data(cfg: DictConfig) -> Any:
    """The run's datamodule, with ``cfg.model``'s input pipeline (its timm data config, read without building it;
    ``model.image_size`` the size it is built for) under the ``dataset.*`` overrides."""
    preprocessing = model_preprocessing(cfg.model.name, image_size=cfg.model.image_size)
    return build_datamodule(cfg.dataset, batch_size=cfg.trainer.batch_size, seed=cfg.seed,
                            data_dir=cfg.paths.data_dir, preprocessing=preprocessing)


def config_shape(cfg: DictConfig) -> dict[str, int]:
    """The model's shape keywords from the config alone (no data read): ``cfg.dataset``'s classes and channels, and
    ``dataset.image_size``, else the model's own input size (its timm data config)."""
    size = cfg.dataset.image_size or model_preprocessing(cfg.model.name, image_size=cfg.model.image_size).input_size
    return {"num_classes": cfg.dataset.num_classes, "in_chans": cfg.dataset.in_chans, "image_size": int(size)}


def build_model(cfg: DictConfig, *, num_classes: int, in_chans: int, image_size: int,
                load: bool = True) -> nn.Module:
    """The timm model of ``cfg.model`` for the dataset's shape; ``load``: with ``model.checkpoint``'s weights (a
    state_dict or Lightning checkpoint; an lrd-exp model file is loaded by :func:`load_model_file` instead)."""
    m = cfg.model
    kwargs = dict(OmegaConf.to_container(m.kwargs, resolve=True) or {})
    kwargs.update(num_classes=num_classes, in_chans=in_chans, drop_rate=m.drop_rate)
    size = m.image_size or image_size
    try:
        try:
            model = timm.create_model(m.name, pretrained=m.pretrained, img_size=size, **kwargs)
        except TypeError:  # architectures without an image-size argument (CNNs)
            model = timm.create_model(m.name, pretrained=m.pretrained, **kwargs)
    except RuntimeError as exc:
        if m.pretrained:
            raise RuntimeError(f"model.pretrained=true: could not load timm weights for {m.name!r} "
                               f"(they are downloaded from the internet on first use): {exc}") from exc
        raise
    if load and m.checkpoint and not is_model_file(m.checkpoint):
        load_checkpoint(model, m.checkpoint, trust=bool(m.trust_checkpoint))
    return model


def load_model_file(cfg: DictConfig, **shape: int) -> nn.Module:
    """The decomposed model saved at ``model.checkpoint``, rebuilt on a fresh ``cfg.model`` (no SVD)."""
    try:
        return model_file.load_decomposed(cfg.model.checkpoint, model=build_model(cfg, **shape, load=False))
    except model_file.ModelFileError as exc:
        raise ConfigError(f"model.checkpoint: {exc}") from None
