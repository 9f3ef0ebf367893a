"""``model.checkpoint`` read safely: a state_dict, a Lightning checkpoint or an lrd-exp model file, checked once at
the start of a job (one line naming the key, before a baseline is trained or a file written) and loaded into a model.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrd_exp.config.schema import enum_value as _v
from lrd_exp.config.validate import ConfigError
from lrd_exp.deploy import model_file

NOT_A_CHECKPOINT = "expected a state_dict, a Lightning .ckpt or an lrd-exp model.pt"


def is_model_file(path: str | None) -> bool:
    """``model.checkpoint`` is an lrd-exp model file (a decomposed model to keep training or to evaluate)."""
    return bool(path) and model_file.is_model_file(path)


def read_checkpoint(path: str, *, trust: bool = False) -> Any:
    """The contents of ``model.checkpoint``, loaded safely: ``torch.load(weights_only=True)`` unpickles plain data
    and tensors only, so a file from a colleague or a hub cannot run code. A file that needs more is refused with
    one line naming the opt-in key (``model.trust_checkpoint=true``), and loads only with it."""
    if not os.path.isfile(path):
        raise ConfigError(f"model.checkpoint={path!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if not trust and "weights only load failed" in str(exc).lower():
            found = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "pickled objects")
            raise ConfigError(f"model.checkpoint={path!r} holds more than tensors and plain data ({found}); "
                              "loading it runs code the file carries: if you trust it, set "
                              "model.trust_checkpoint=true") from None
        raise ConfigError(f"model.checkpoint={path!r} is corrupt or not a torch checkpoint "
                          f"({type(exc).__name__}): {NOT_A_CHECKPOINT}") from None
    except Exception as exc:
        raise ConfigError(f"model.checkpoint={path!r} is corrupt or not a torch checkpoint "
                          f"({type(exc).__name__}): {NOT_A_CHECKPOINT}") from None


def check_checkpoint(path: str, *, trust: bool = False, model_name: str | None = None) -> bool:
    """A checkpoint that cannot be read fails here, before a baseline is trained or a file written; returns whether
    it is an lrd-exp model file (a decomposed model)."""
    state = read_checkpoint(path, trust=trust)
    if model_file.is_model_payload(state):
        saved = (state.get("model") or {}).get("name")
        if model_name is not None and saved and saved != model_name:
            raise ConfigError(f"model.checkpoint={path!r} holds a decomposed {saved}, but model.name={model_name}: "
                              f"run with model.name={saved}")
        return True
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(f"model.checkpoint={path!r} holds no state_dict of tensors: {NOT_A_CHECKPOINT}")
    return False


def check_model_checkpoint(cfg: DictConfig) -> None:
    """The run's ``model.checkpoint`` (if any) is readable and fits the task: ConfigError with one line if not."""
    ckpt = cfg.model.checkpoint
    if ckpt is None:
        return
    decomposed = check_checkpoint(ckpt, trust=bool(cfg.model.get("trust_checkpoint", False)),
                                  model_name=cfg.model.name)
    if decomposed and _v(cfg.task) == "advise":
        raise ConfigError(f"model.checkpoint={ckpt!r} is a decomposed model (an lrd-exp model file): task=advise "
                          "decomposes the original, so give its weights (a state_dict or .ckpt) or none")


def load_checkpoint(model: nn.Module, path: str, *, trust: bool = False) -> None:
    """Copy a state_dict or Lightning checkpoint into ``model`` (its ``model.`` prefix dropped); ConfigError when
    it does not fit."""
    state = read_checkpoint(path, trust=trust)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint={path!r} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"model.checkpoint={path!r} does not fit {type(model).__name__}: {first}") from None
