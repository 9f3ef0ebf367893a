"""The ``rank`` node as one typed object: every key's default, checked once when built, never written afterwards.

``run.py`` builds it from the config before any work; :func:`lrd_exp.decompose_model` builds it from its keywords
(which default to these fields). What a decomposition finds (the rank search's statistics, what became of
BatchNorm) goes in its report, not here. No torch, no Hydra.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from lrd_exp.config.values import check_rank_keys, enum_value


@dataclass(frozen=True)
class RankSettings:
    """One decomposition's settings; ``docs/ranks.md`` says what each key does."""

    policy: str = "quantized"
    ratio: float = 2.0
    energy: float = 0.95
    multiple: int = 8
    rounding: str = "nearest"
    base: str = "ratio"
    rank: Any = None
    window: float = 0.25
    step: int = 8
    objective: str = "train"
    tolerance: float = 0.03
    budget: str = "model"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_stem: bool = True
    skip_head: bool = True
    fit: str = "auto"
    calibration_images: int = 256
    calibrate: str = "independent"
    recalibrate_bn: bool = True
    check_images: int = 256
    min_agreement: float = 0.5
    allocation: str = "uniform"
    budget_by: str = "params"
    max_damage: float | None = None
    damage_images: int = 128
    damage_by: str = "measured"

    @classmethod
    def from_keys(cls, **keys: Any) -> RankSettings:
        """Checked by the ``rank`` node's rules (one ValueError naming the key; an unknown key is a TypeError as a
        keyword would be); OmegaConf containers and enums become plain values, ``include`` / ``exclude`` tuples
        of patterns (one string is one pattern)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(keys) - known)
        if unknown:
            raise TypeError(f"unknown rank key(s) {', '.join(unknown)}: the rank node has {', '.join(sorted(known))}")
        plain = {key: plain_value(value) for key, value in keys.items()}
        values = {**{f.name: getattr(cls, f.name) for f in fields(cls)}, **plain}
        checked = check_rank_keys(**values)
        for key in ("skip_stem", "skip_head", "recalibrate_bn"):
            if not isinstance(values[key], bool):
                raise ValueError(f"rank.{key}={values[key]!r} is not allowed: true or false")
        return cls(**{**values, **checked, "include": patterns(values["include"], "rank.include"),
                      "exclude": patterns(values["exclude"], "rank.exclude")})

    def resolved(self, calibration: bool) -> RankSettings:
        """``fit=auto`` made concrete (activations wherever calibration inputs exist, weights otherwise);
        ``fit=activations`` without them is one ValueError."""
        if self.fit == "activations" and not calibration:
            raise ValueError("fit='activations' needs calibration=: a tensor or an iterable of batches of the "
                             "model's inputs (or use fit='weights')")
        if self.fit != "auto":
            return self
        return replace(self, fit="activations" if calibration else "weights")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for the patterns), as the report and the row's ``rank_params`` show them."""
        out = asdict(self)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        return out


def plain_value(value: Any) -> Any:
    """OmegaConf containers and enums -> plain Python, so ``decompose_model(model, **cfg.rank)`` works. A container
    is known by its module: nothing here imports OmegaConf (whoever made the container did)."""
    if type(value).__module__.startswith("omegaconf."):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return enum_value(value)


def patterns(value: Any, key: str = "rank.include") -> tuple[str, ...]:
    """``rank.include`` / ``rank.exclude`` as patterns: one string is one pattern, not its letters; anything but
    strings is one ValueError naming ``key``."""
    value = plain_value(value)
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{key}={value!r} is not allowed: a list of fnmatch patterns of layer names (or one)")
    return tuple(items)


#: the defaults, for the keywords of :func:`lrd_exp.decompose_model` and the Hydra schema's ``RankConfig``
DEFAULTS = RankSettings()
