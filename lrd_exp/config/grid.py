"""A grid of configurations (``advise.grid``): config keys and the values to try, their product in order.

``{"rank": {"ratio": [2, 4]}, "freeze": {"schedule": ["none", "sequential"]}}`` gives four configurations, each
a flat ``{"rank.ratio": 2, "freeze.schedule": "none"}`` that :func:`apply` sets on a copy of the run's config.
Only ``rank.*`` and ``freeze.*`` vary: they are what a decomposed configuration is, measurable without training.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lrd_exp.config.validate import ConfigError, validate_rank_freeze

GRID_SECTIONS = ("rank", "freeze")


def axes(grid: Mapping[str, Any] | DictConfig, cfg: DictConfig | None = None) -> dict[str, list[Any]]:
    """The grid's axes, ``{"rank.ratio": [values], ...}`` in the order given; a scalar is a one-value axis.

    With ``cfg``, every key must exist in it (a typo fails here, naming the key and what it may be).
    """
    if isinstance(grid, DictConfig):
        grid = OmegaConf.to_container(grid, resolve=True, enum_to_str=True)
    out: dict[str, list[Any]] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, Mapping) and path != "rank.rank":  # rank.rank's values are themselves mappings
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
            return
        values = list(node) if isinstance(node, (list, tuple, ListConfig)) else [node]
        if not values:
            raise ConfigError(f"advise.grid.{path}=[] is not allowed: give at least one value")
        out[path] = values

    for section, node in (grid or {}).items():
        if section not in GRID_SECTIONS:
            raise ConfigError(f"advise.grid.{section} is not allowed: the grid varies {' and '.join(GRID_SECTIONS)} "
                              "keys (what a configuration is; everything else is the run's own config)")
        if not isinstance(node, Mapping):
            raise ConfigError(f"advise.grid.{section}={node!r} is not allowed: a mapping of {section} keys to values")
        walk(node, section)
    if cfg is not None:
        for key, values in out.items():
            section, _, name = key.partition(".")
            if name.split(".")[0] not in cfg[section]:
                allowed = ", ".join(str(k) for k in cfg[section])
                raise ConfigError(f"advise.grid.{key} is not allowed: {section} has no key {name!r} "
                                  f"(its keys: {allowed})")
            if isinstance(OmegaConf.select(cfg, key), ListConfig) and not all(isinstance(v, list) for v in values):
                raise ConfigError(f"advise.grid.{key}={_text(values)} is not allowed: {key} is itself a list, so "
                                  f"the values to try are a list of lists (e.g. [{_text(values)}])")
    return out


def expand(grid: Mapping[str, Any] | DictConfig, cfg: DictConfig | None = None,
           exclude: Any = ()) -> list[dict[str, Any]]:
    """Every configuration of the grid: flat ``{key: value}`` dicts, the last axis varying fastest, without those
    matching an ``exclude`` entry (a partial grid-shaped mapping: ``{"rank": {"policy": "optimized",
    "multiple": 64}}`` leaves out every optimized configuration at multiple 64)."""
    ax = axes(grid, cfg)
    if isinstance(exclude, (DictConfig, ListConfig)):
        exclude = OmegaConf.to_container(exclude, resolve=True, enum_to_str=True)
    rules = []
    for i, entry in enumerate(exclude or ()):
        try:
            values = axes(entry, cfg) if isinstance(entry, Mapping) else {}
        except ConfigError as exc:
            raise ConfigError(f"advise.exclude[{i}]: {exc}".replace("advise.grid.", "")) from None
        if not values or any(len(v) != 1 for v in values.values()) or (cfg is None and not set(values) <= set(ax)):
            raise ConfigError(f"advise.exclude[{i}]={entry!r} is not allowed: a mapping of rank / freeze keys to one "
                              "value each, e.g. {rank: {policy: optimized, multiple: 64}}")
        rules.append({k: v[0] for k, v in values.items()})

    def excluded(config: dict[str, Any]) -> bool:  # a key that is not an axis has the run's own value
        return any(all(_same(config[k] if k in config else OmegaConf.select(cfg, k), v) for k, v in rule.items())
                   for rule in rules)

    configs = [dict(zip(ax, combo)) for combo in itertools.product(*ax.values())]
    return [c for c in configs if not excluded(c)]


def _same(a: Any, b: Any) -> bool:
    return a == b or _text(a) == _text(b)


def apply(cfg: DictConfig, config: Mapping[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with one configuration's keys set, checked as a run would be (ConfigError otherwise)."""
    out = copy.deepcopy(cfg)
    for key, value in config.items():
        try:
            OmegaConf.update(out, key, value, merge=False)
        except OmegaConfBaseException as exc:
            first = str(exc).splitlines()[0]
            raise ConfigError(f"advise.grid.{key}={value!r} is not allowed: {first}") from None
    try:
        validate_rank_freeze(out)
    except ValueError as exc:  # ConfigError included: the message names the key and the allowed values
        raise ConfigError(f"advise.grid: {exc}") from None
    return out


def label(config: Mapping[str, Any]) -> str:
    """``ratio=2 policy=quantized multiple=8 schedule=sequential``: a configuration, short and readable."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={_text(value)}" for key, value in config.items())


def overrides(config: Mapping[str, Any]) -> list[str]:
    """The configuration as command-line overrides (``rank.ratio=2``)."""
    return [f"{key}={_text(value)}" for key, value in config.items()]


def _text(value: Any) -> str:
    """A value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return str(getattr(value, "value", value))
