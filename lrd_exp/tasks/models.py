"""The run's model, built in one place: :func:`run_model` gives a task the timm model of ``model.name`` for the
data's shape (with ``model.checkpoint``'s weights, or trained as the baseline and cached), or the decomposed model of
an lrd-exp model file; and the run's data, fed the inputs that this model expects. Below this module, functions take
the ``model`` node and the shape, never the whole config; this is also the one module of ``tasks/`` that reads and
writes model files."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import pandas as pd
import timm
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrd_exp.config.validate import ConfigError
from lrd_exp.deploy import model_file
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.tasks.checkpoint import is_model_file, load_checkpoint
from lrd_exp.training.baseline import baseline_spec, get_or_train
from lrd_exp.training.data import build_datamodule
from lrd_exp.training.preprocessing import model_preprocessing
from lrd_exp.training.trainer import fit, make_loggers

if TYPE_CHECKING:
    from lrd_exp.config.schema import ModelConfig

log = logging.getLogger("lrd_exp")


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


def creation_kwargs(spec: ModelConfig, shape: dict[str, int], *, img_size: bool) -> dict[str, Any]:
    """``timm.create_model``'s keywords for the ``model`` node ``spec`` at the data's ``shape``; ``img_size``: with
    the image size too (only some architectures take one; ``model.kwargs.img_size``, if given, wins)."""
    kwargs = dict(OmegaConf.to_container(spec.kwargs, resolve=True) or {})
    kwargs.update(num_classes=shape["num_classes"], in_chans=shape["in_chans"], drop_rate=spec.drop_rate)
    if img_size:
        kwargs.setdefault("img_size", spec.image_size or shape["image_size"])
    return kwargs


def build_original(spec: ModelConfig, *, num_classes: int, in_chans: int, image_size: int,
                   load: bool = True) -> nn.Module:
    """The timm model of the ``model`` node ``spec`` for the data's shape; ``load``: with ``model.checkpoint``'s
    weights (a state_dict or Lightning checkpoint; an lrd-exp model file is :func:`run_model`'s to load)."""
    shape = {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size}
    try:
        try:
            model = timm.create_model(spec.name, pretrained=spec.pretrained,
                                      **creation_kwargs(spec, shape, img_size=True))
        except TypeError:  # architectures without an image-size argument (CNNs)
            model = timm.create_model(spec.name, pretrained=spec.pretrained,
                                      **creation_kwargs(spec, shape, img_size=False))
    except RuntimeError as exc:
        if spec.pretrained:
            raise RuntimeError(f"model.pretrained=true: could not load timm weights for {spec.name!r} "
                               f"(they are downloaded from the internet on first use): {exc}") from exc
        raise
    if load and spec.checkpoint and not is_model_file(spec.checkpoint):
        load_checkpoint(model, spec.checkpoint, trust=bool(spec.trust_checkpoint))
    return model


def load_model_file(spec: ModelConfig, **shape: int) -> nn.Module:
    """The decomposed model saved at ``model.checkpoint``, rebuilt on a fresh original of ``spec`` (no SVD)."""
    try:
        return model_file.load_decomposed(spec.checkpoint, model=build_original(spec, **shape, load=False))
    except model_file.ModelFileError as exc:
        raise ConfigError(f"model.checkpoint: {exc}") from None


@dataclass
class RunModel:
    """The run's model as a task receives it from :func:`run_model`.

    ``original`` is the model before decomposition: the baseline (trained or cached), or the timm model with
    ``model.checkpoint``'s weights. A job that starts from a model file has ``decomposed`` (the file's model) and,
    for the side-by-side speed, an untrained ``original`` of the same architecture; both are built when first used,
    so a task builds only what it uses."""

    spec: Any  # the ``model`` node
    shape: dict[str, int]
    from_file: bool
    fields: dict[str, Any] = field(default_factory=dict)  # the row's baseline columns (cache hit, path)
    curves: list[dict[str, Any]] = field(default_factory=list)  # the baseline's training curve
    built: nn.Module | None = None  # the original, when built by run_model

    @cached_property
    def decomposed(self) -> nn.Module | None:
        """A model file's decomposed model (None for a job that decomposes the original itself)."""
        return load_model_file(self.spec, **self.shape) if self.from_file else None

    @cached_property
    def original(self) -> nn.Module:
        return self.built if self.built is not None else build_original(self.spec, **self.shape, load=False)

    @property
    def model(self) -> nn.Module:
        """The model the run has: a model file's, else the original."""
        return self.decomposed if self.from_file else self.original

    def file_rank(self) -> Any:
        """The rank settings a model file was decomposed with (its ``meta``; None without)."""
        return model_file.read_model_file(self.spec.checkpoint)["meta"].get("rank")

    def file_report(self) -> str:
        """``decomposition.txt`` of a job that starts from a model file: the layers it holds (none decomposed here)."""
        layers = model_file.structure(self.decomposed)
        log.info("loaded %s: %d factorized layers, no decomposition", self.spec.checkpoint, len(layers))
        return f"loaded from {self.spec.checkpoint}\n" + pd.DataFrame(layers).to_string(index=False) + "\n"

    def save(self, model: nn.Module, path: str, **meta: Any) -> str:
        """``model`` (decomposed from this run's model) as a self-describing file at ``path`` (lrd_exp.load_decomposed
        rebuilds it from the timm name and the arguments it was built with); ``meta`` stored as plain data."""
        takes_size = "img_size" in inspect.signature(type(model).__init__).parameters
        kwargs = creation_kwargs(self.spec, self.shape, img_size=takes_size)
        model_file.save_decomposed(model, path, model_name=self.spec.name, model_kwargs=kwargs, **meta)
        return path


def run_model(cfg: DictConfig, device: DeviceInfo, out_dir: str, dm: Any = None, *,
              train_baseline: bool = False) -> RunModel:
    """The run's model, from ``model.name`` (timm), ``model.checkpoint``'s weights or an lrd-exp model file: what
    every task builds its model with, once. Shaped for ``dm`` (else the config's dataset); ``train_baseline``: the
    original is the baseline, trained on ``dm`` or read from the cache (:func:`baseline`)."""
    shape = data_shape(dm) if dm is not None else config_shape(cfg)
    if is_model_file(cfg.model.checkpoint):
        return RunModel(cfg.model, shape, from_file=True)
    if not train_baseline:
        return RunModel(cfg.model, shape, from_file=False, built=build_original(cfg.model, **shape))
    original, curves, fields = baseline(cfg, device, dm, out_dir)
    return RunModel(cfg.model, shape, from_file=False, fields=fields, curves=curves, built=original)


def baseline(cfg: DictConfig, device: DeviceInfo, dm: Any, out_dir: str
             ) -> tuple[nn.Module, list[dict[str, Any]], dict[str, Any]]:
    """The original model, trained or read from the baseline cache: (model, its curve, cache columns)."""
    t = cfg.trainer
    shape = data_shape(dm)

    def train_baseline() -> dict:
        model = build_original(cfg.model, **shape)
        curve = []
        if t.baseline_epochs > 0:
            log.info("training the baseline: %s, %d epochs", cfg.model.name, t.baseline_epochs)
            module = fit(t, cfg.device, device, model, dm, epochs=t.baseline_epochs, optim=t.baseline_optim,
                         out_dir=out_dir, stage="baseline", loggers=make_loggers(cfg.logger, out_dir, "baseline"))
            curve = module.curve
        return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "curve": curve}

    spec = baseline_spec(cfg.model, cfg.dataset, t, cfg.seed)
    entry, hit, path = get_or_train(spec, cfg.paths.cache_dir, train_baseline)
    original = build_original(cfg.model, **shape)
    original.load_state_dict(entry["state_dict"])
    curves = [dict(c, stage="baseline") for c in entry.get("curve", [])]
    return original, curves, {"baseline_cache_hit": hit, "baseline_path": path}
