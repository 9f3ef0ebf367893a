"""Time to accuracy: how many fine-tuning epochs and seconds until top-1 is within a drop of the original's.

:class:`TimeToTarget` is a Lightning callback given the original's top-1 and the drop (``trainer.target_drop``, else
:data:`DEFAULT_TARGET_DROP`); after each fine-tuning validation it records the epochs trained, the wall-clock seconds
since fit start (up to the end of that validation) and the validation top-1. The first record within the target
gives ``finetune_epochs_to_target`` and ``finetune_s_to_target``; with ``stop`` it ends the fit there.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl

#: Points of top-1 the to-target columns measure against when ``trainer.target_drop`` is null.
DEFAULT_TARGET_DROP = 0.5

# top-1 values are 100 * k / n: a float comparison must not miss an exact tie with the target
_EPS = 1e-9


def within(top1: float | None, top1_original: float, drop: float) -> bool:
    """``top1`` (percent) is at most ``drop`` points below ``top1_original``."""
    return top1 is not None and math.isfinite(top1) and top1 >= top1_original - drop - _EPS


class TimeToTarget(pl.Callback):
    """Records ``(epochs, seconds, top-1)`` after each fine-tuning validation and the first within the target.

    ``top1_original`` and the validation top-1 are percent (``100 * val/acc``, the scale of the row's top-1s).
    ``top1_start`` (the decomposed model's top-1 before fine-tuning) already within the target gives 0 epochs and
    0.0 s. ``stop=True`` (``trainer.target_drop`` set) sets ``trainer.should_stop`` once the target is reached; the
    caller skips the fit when it was reached at the start (:attr:`skip_fit`). Sanity-check validation does not
    count. The records are plain data (they come back from DDP workers) and are kept in checkpoints, so a
    resumed fit adds to the seconds already spent.
    """

    def __init__(self, top1_original: float, drop: float | None = None, *, stop: bool = False,
                 top1_start: float | None = None, metric: str = "val/acc", scale: float = 100.0) -> None:
        self.top1_original = float(top1_original)
        self.drop = DEFAULT_TARGET_DROP if drop is None else float(drop)
        self.stop = bool(stop)
        self.metric, self.scale = metric, float(scale)
        self.records: list[dict[str, float]] = []  # {"epochs", "s", "top1"} per validation
        self.epochs_to_target: int | None = None
        self.s_to_target: float | None = None
        if within(top1_start, self.top1_original, self.drop):
            self.epochs_to_target, self.s_to_target = 0, 0.0
        self._t0: float | None = None
        self._offset = 0.0  # seconds spent before a resume

    @property
    def target(self) -> float:
        """The top-1 (percent) to reach."""
        return self.top1_original - self.drop

    @property
    def reached(self) -> bool:
        return self.epochs_to_target is not None

    @property
    def skip_fit(self) -> bool:
        """Stop at the target and it holds before fine-tuning: no epoch to run."""
        return self.stop and self.epochs_to_target == 0

    def fields(self) -> dict[str, Any]:
        """The row's to-target columns (``time_to_target_s`` is derived from them and ``decompose_s``)."""
        return {"target_drop": self.drop, "finetune_epochs_to_target": self.epochs_to_target,
                "finetune_s_to_target": self.s_to_target}

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop and self.reached:  # a resumed fit that had already reached it
            trainer.should_stop = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._t0 is None:
            return
        value = trainer.callback_metrics.get(self.metric)
        top1 = None if value is None else self.scale * float(value)
        seconds = self._offset + time.perf_counter() - self._t0
        epochs = trainer.current_epoch + 1
        self.records.append({"epochs": epochs, "s": seconds, "top1": top1})
        if not self.reached and within(top1, self.top1_original, self.drop):
            self.epochs_to_target, self.s_to_target = epochs, seconds
        if self.stop:  # every rank decides alike (the metric is synced); reduce anyway, as EarlyStopping does
            should = trainer.strategy.reduce_boolean_decision(self.reached, all=False)
            trainer.should_stop = trainer.should_stop or should

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        spent = self.records[-1]["s"] if self.records else self._offset
        return {"records": list(self.records), "epochs_to_target": self.epochs_to_target,
                "s_to_target": self.s_to_target, "spent_s": spent}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict.get("records", []))
        if self.epochs_to_target != 0:  # reached before fine-tuning stays reached at 0
            self.epochs_to_target = state_dict.get("epochs_to_target")
            self.s_to_target = state_dict.get("s_to_target")
        self._offset = float(state_dict.get("spent_s", 0.0))
