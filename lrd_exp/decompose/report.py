"""What a decomposition did, per layer and in total: the evidence a user checks before trusting a speedup."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from lrd_exp.decompose.check import OutputCheck

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class LayerReport:
    name: str
    kind: str  # svd | tucker2 | the original type when kept
    action: str  # decomposed | kept
    weight_shape: tuple[int, ...]
    factor_shapes: list[tuple[int, ...]] = field(default_factory=list)
    ranks: tuple[int, ...] = ()
    full_ranks: tuple[int, ...] = ()
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None  # forward FLOPs per sample (2 per multiply-add)
    flops_after: int | None = None
    rel_error: float = 0.0  # error_of=weight: ||W - W'||_F / ||W||_F; output: ||(W - W') X||_F / ||W X||_F
    reason: str = ""
    error_of: str = "weight"  # weight | output (on the calibration inputs, fit=activations)
    damage: float | None = None  # rank.allocation global / fastest: the measured damage of cutting this layer alone


@dataclass
class DecompositionReport:
    policy: str
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0  # the whole model, counted from its parameters
    params_after: int = 0
    flops_before: int | None = None  # forward FLOPs per sample of the candidate layers (not the whole model)
    flops_after: int | None = None
    settings: dict = field(default_factory=dict)  # the checked rank settings (RankSettings.to_dict)
    rank_search: dict | None = None  # policy=optimized: what the rank search timed and read from its cache
    rank_timings: list[dict] = field(default_factory=list)  # policy=optimized: every timed candidate, a row each
    fit: str = "weights"  # weights | activations: what the factors were fitted to
    calibration_images: int = 0  # samples the activations were fitted on (and BatchNorm re-estimated)
    calibration_s: float = 0.0  # forward passes and moments on them, and the BatchNorm re-estimation
    decompose_s: float = 0.0  # the whole decomposition, calibration included
    check: OutputCheck | None = None  # the end-to-end check against the original (None: no inputs, or off)
    # BatchNorm re-estimation: kept (the check says it helped) | rejected (it hurt: the old statistics stay) |
    # unchecked (no check inputs) | off (not asked, or no calibration inputs) | no BatchNorm
    bn_recalibration: str = "off"
    bn_damage: tuple[float, float] | None = None  # the check's damage without and with re-estimation
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. a collapsed model
    # rank.allocation global / fastest: budget, spent, predicted damage (sum over layers) and the uniform ranks' own
    allocation: dict | None = None

    @property
    def error_column(self) -> str:
        """What ``rel_error`` measures, as the table names it."""
        return "output_error" if any(layer.error_of == "output" for layer in self.layers) else "weight_error"

    def why_dense(self) -> str:
        """Why every layer was kept, most common reasons first (for a decomposition that changed nothing)."""
        if not self.layers:
            return "the model has no Linear or Conv2d layer to decompose"
        counts: dict[str, int] = {}
        for layer in self.layers:
            reason = " ".join(re.sub(r"\([^)]*\)", "", layer.reason).split()) or "kept"  # without the numbers
            counts[reason] = counts.get(reason, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        return "; ".join(f"{n} x {reason}" for reason, n in ranked[:4])

    @property
    def decomposed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.action == "decomposed"]

    @property
    def decomposed_params_before(self) -> int:
        return sum(layer.params_before for layer in self.decomposed)

    @property
    def decomposed_params_after(self) -> int:
        return sum(layer.params_after for layer in self.decomposed)

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def flops_ratio(self) -> float | None:
        if not self.flops_before or not self.flops_after:
            return None
        return self.flops_before / self.flops_after

    @property
    def approx_error(self) -> float:
        """Mean relative error over the model's weight layers (Linear, Conv2d; a layer left dense, skipped or
        excluded counts 0): of the output on the calibration inputs when fitted to them, else of the weight.

        The accuracy proxy of ``task=advise``: how far the decomposed model is from the original before
        fine-tuning, comparable between configurations of one model (results/advise_digits checks it against top-1).
        """
        return sum(layer.rel_error for layer in self.layers) / len(self.layers) if self.layers else 0.0

    def to_frame(self) -> pd.DataFrame:
        """One row per layer (pandas is imported here: the library itself needs torch alone)."""
        import pandas as pd

        rows = []
        for layer in self.layers:
            row = asdict(layer)
            for key in ("weight_shape", "ranks", "full_ranks"):
                row[key] = "x".join(map(str, row[key])) if row[key] else ""
            row["factor_shapes"] = " | ".join("x".join(map(str, s)) for s in layer.factor_shapes)
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy,
            "settings": self.settings,
            "rank_search": self.rank_search,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "fit": self.fit,
            "calibration_images": self.calibration_images,
            "calibration_s": self.calibration_s,
            "decompose_s": self.decompose_s,
            "check": self.check.to_dict() if self.check is not None else None,
            "bn_recalibration": self.bn_recalibration,
            "warnings": list(self.warnings),
            "allocation": self.allocation,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def summary(self) -> str:
        n_dec = len(self.decomposed)
        flops = ""
        if self.flops_ratio:
            flops = (f", forward FLOPs {self.flops_before / 1e6:.1f}M -> {self.flops_after / 1e6:.1f}M "
                     f"({self.flops_ratio:.2f}x)")
        part = ""
        if n_dec:
            part = (f"; decomposed layers {self.decomposed_params_before:,} -> {self.decomposed_params_after:,} "
                    f"({self.decomposed_params_before / max(self.decomposed_params_after, 1):.2f}x)")
        fit = (f"; fitted to the outputs of {self.calibration_images} calibration samples ({self.calibration_s:.1f} s)"
               if self.fit == "activations" else "")
        return (f"policy={self.policy}: {n_dec}/{len(self.layers)} candidate layers decomposed; "
                f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.2f}x){part}{flops}{fit}"
                f"{self.allocation_line()}{self.check_line()}")

    def allocation_line(self) -> str:
        """``; allocation=global by params: predicted damage 0.012 (uniform ranks: 0.031)`` (empty when uniform)."""
        a = self.allocation
        if not a:
            return ""
        return (f"; allocation={a['allocation']} by {a['budget_by']} (budget {a['budget']:.4g}, spent "
                f"{a['spent']:.4g}): predicted damage {a['predicted_damage']:.3g} (uniform ranks: "
                f"{a['uniform_predicted_damage']:.3g}; {a['damage_measured']} layer cuts "
                f"{'estimated (fisher)' if a.get('damage_by') == 'fisher' else 'measured'}, "
                f"{a['damage_cached']} cached)")

    def check_line(self) -> str:
        """``; against the original: agreement ..., BatchNorm re-estimation kept`` (empty without a check)."""
        if self.check is None:
            return ""
        bn = {"kept": "; BatchNorm re-estimated (it helped)",
              "rejected": "; BatchNorm re-estimation rejected (it hurt: the original statistics kept)",
              "unchecked": "; BatchNorm re-estimated"}.get(self.bn_recalibration, "")
        return f"; against the original: {self.check.describe()}{bn}"

    def table(self, max_rows: int | None = 60) -> str:
        df = self.to_frame()
        if df.empty:
            return self.summary()
        cols = ["name", "kind", "action", "weight_shape", "ranks", "params_before", "params_after",
                "flops_before", "flops_after", "rel_error", *(["damage"] if self.allocation else []), "reason"]
        df = df[cols].copy()
        df["rel_error"] = df["rel_error"].map(lambda v: f"{v:.3g}")
        df = df.rename(columns={"rel_error": self.error_column})
        if max_rows is not None and len(df) > max_rows:
            df = df.iloc[list(range(max_rows // 2)) + list(range(len(df) - max_rows // 2, len(df)))]
        return "\n".join([df.to_string(index=False), self.summary(), *(f"WARNING: {w}" for w in self.warnings)])

    def __str__(self) -> str:
        return self.table()
