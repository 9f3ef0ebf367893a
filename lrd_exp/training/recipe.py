"""The fine-tuning recipe of a decomposed model: the configured one, or the gentler one for a calibrated start.

A decomposition fitted to the layers' outputs (``rank.fit`` resolved to activations) starts within about a point of
the original; the configured recipe (``trainer.finetune_optim``, made to repair the paper's weight fit) lowers it.
:func:`resolve_recipe` turns ``trainer.calibrated`` into what the Classifier gets: the learning rate scaled, its
warm-up, distillation from the original, BatchNorm's mode (results/finetune_recipe/recipe_check.md chose them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from lrd_exp.config.values import enum_value

#: the row's ``finetune_recipe`` values
CALIBRATED, CONFIGURED = "calibrated", "configured"


@dataclass(frozen=True)
class FinetuneRecipe:
    """What one fine-tuning runs with: ``optim`` as the Classifier gets it, distillation on / off, BatchNorm mode."""

    name: str  # CALIBRATED | CONFIGURED
    optim: dict[str, Any] = field(default_factory=dict)
    distill: bool = False
    bn: str = "train"

    def describe(self) -> str:
        """One line for the job's log."""
        warmup = float(self.optim.get("warmup_epochs", 0.0) or 0.0)
        kd = "distilled from the original" if self.distill else "no distillation"
        return (f"{self.name}: {self.optim.get('name')} lr {float(self.optim.get('lr', 0.0)):g}, warm-up {warmup:g} "
                f"epochs, {self.optim.get('scheduler')}, {kd}, BatchNorm in {self.bn} mode")


def _plain(node: Any) -> dict[str, Any]:
    """A config node (DictConfig or mapping) as a plain dict with enum values as strings."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return {k: enum_value(v) for k, v in dict(node or {}).items()}


def resolve_recipe(trainer: Any, fit: str | None) -> FinetuneRecipe:
    """The recipe for a decomposition fitted by ``fit`` (``report.fit``; None: unknown, e.g. a model file's job):
    ``trainer.calibrated`` applies when fit is activations and it is enabled; otherwise the configured recipe."""
    optim = _plain(trainer.get("finetune_optim"))
    distill = bool((trainer.get("distill") or {}).get("enabled", False))
    cal = _plain(trainer.get("calibrated"))
    if enum_value(fit) != "activations" or not cal.get("enabled", False):
        return FinetuneRecipe(CONFIGURED, optim, distill, "train")
    optim["lr"] = float(optim.get("lr", 0.05)) * float(cal.get("lr_scale", 1.0))
    if cal.get("warmup_epochs") is not None:
        optim["warmup_epochs"] = float(cal["warmup_epochs"])
    return FinetuneRecipe(CALIBRATED, optim, distill or bool(cal.get("distill", False)), str(cal.get("bn", "train")))
