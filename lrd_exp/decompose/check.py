"""The end-to-end check: the decomposed model against the original on inputs the fit did not use, no labels needed.

Per-layer errors do not say whether the model survived: a few thin layers cut too far can turn every prediction,
while each layer's own error looks moderate. So the model's outputs are compared as a whole: the relative error of
the outputs, and, where the output holds class scores (its last dimension), the share of predictions that stayed the
same (top-1 agreement) and the KL divergence of the predicted distributions. The original's outputs are recorded
before the surgery (the model is decomposed in place); long outputs (a language model's logits) are subsampled to
at most :data:`MAX_ROWS` rows, the same rows before and after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrd_exp.batches import Batch, batch_size_of
from lrd_exp.decompose.calibration import EvalModes, run_batch

#: output rows (samples x positions) kept per check; beyond it a seeded subset of rows is compared
MAX_ROWS = 65536
#: the default of ``min_agreement``: below this share of unchanged predictions a decomposition counts as destroyed
MIN_AGREEMENT = 0.5


class DecompositionWarning(UserWarning):
    """A decomposition that ran but left a model that no longer behaves like the original."""


@dataclass
class OutputCheck:
    """How far the decomposed model's outputs are from the original's, on ``images`` samples."""

    images: int
    held_out: bool  # the inputs were not used to fit the factors (False: the calibration inputs, reused)
    rel_error: float  # ||f'(x) - f(x)||_F / ||f(x)||_F over all outputs
    agreement: float | None = None  # share of predictions (argmax of the last dimension) unchanged; None: no scores
    kl: float | None = None  # mean KL(softmax f(x) || softmax f'(x)) per prediction, in nats

    @property
    def damage(self) -> float:
        """One number to compare two versions of a model by (lower is better): KL for class scores, else the
        relative output error."""
        return self.kl if self.kl is not None else self.rel_error

    def describe(self) -> str:
        """``agreement 97.1 %, KL 0.012, output error 0.084 on 256 held-out images``."""
        parts = [f"agreement {100 * self.agreement:.1f} %"] if self.agreement is not None else []
        parts += [f"KL {self.kl:.3g}"] if self.kl is not None else []
        parts.append(f"output error {self.rel_error:.3g}")
        where = "held-out" if self.held_out else "calibration (no held-out inputs given)"
        return f"{', '.join(parts)} on {self.images} {where} samples"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def main_output(out: Any) -> torch.Tensor:
    """The tensor a model's output is judged by: itself, ``logits`` of a mapping (Hugging Face), else the first
    tensor it holds."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        if "logits" in out.keys():
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for value in out:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
            if not isinstance(value, torch.Tensor):
                try:
                    return main_output(value)
                except TypeError:
                    continue
    raise TypeError(f"the model's output holds no floating-point tensor to compare ({type(out).__name__})")


def has_scores(out: torch.Tensor) -> bool:
    """Whether an output holds class scores (its last dimension, more than one): KL and agreement apply. A 1-D
    output is one value per sample, not scores across the batch."""
    return out.dim() >= 2 and out.shape[-1] > 1


def _rows(out: torch.Tensor) -> torch.Tensor:
    """Outputs as rows of class scores (or values): (samples x positions, last dimension), float32 on the CPU."""
    out = out.detach().float().cpu()
    return out.reshape(-1, out.shape[-1]) if out.dim() >= 2 else out.reshape(-1, 1)


class Reference:
    """The original model's outputs on the check's batches, recorded before the surgery: at most
    ``MAX_ROWS / len(batches)`` rows per batch (a seeded subset; the same rows are compared after)."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], *, held_out: bool, seed: int = 0) -> None:
        self.batches, self.held_out = list(batches), held_out
        self.images = sum(batch_size_of(b) for b in self.batches)
        per_batch = max(1, MAX_ROWS // max(len(self.batches), 1))
        g = torch.Generator().manual_seed(seed)
        self.index: list[torch.Tensor | None] = []
        self.outputs: list[torch.Tensor] = []
        self.what = "an evaluation batch" if held_out else "a calibration batch"
        for out in _outputs(model, self.batches, self.what):
            index = torch.randperm(out.shape[0], generator=g)[:per_batch] if out.shape[0] > per_batch else None
            self.index.append(index)
            self.outputs.append(out if index is None else out[index])

    def compare(self, model: nn.Module) -> OutputCheck:
        """``model`` (the decomposed one) against the recorded outputs."""
        diff = norm = agree = kl = 0.0
        rows = 0
        scores = self.outputs[0].shape[-1] > 1
        for ref, new, index in zip(self.outputs, _outputs(model, self.batches, self.what), self.index):
            ref, new = ref.double(), (new if index is None else new[index]).double()
            if new.shape != ref.shape:
                raise ValueError(f"the decomposed model's outputs have shape {tuple(new.shape)}, the original's "
                                 f"{tuple(ref.shape)}")
            diff += float((new - ref).pow(2).sum())
            norm += float(ref.pow(2).sum())
            rows += ref.shape[0]
            if scores:
                agree += float((new.argmax(-1) == ref.argmax(-1)).sum())
                kl += float(F.kl_div(F.log_softmax(new, -1), F.log_softmax(ref, -1), log_target=True,
                                     reduction="sum"))
        rel = (diff / norm) ** 0.5 if norm > 0 else (0.0 if diff == 0 else float("inf"))
        return OutputCheck(images=self.images, held_out=self.held_out, rel_error=rel,
                           agreement=agree / rows if scores else None, kl=kl / rows if scores else None)


def _outputs(model: nn.Module, batches: Sequence[Batch], what: str):
    """Each batch's output rows, one batch at a time (``what`` names the batch in an error)."""
    with EvalModes(model):
        for b in batches:
            yield _rows(main_output(run_batch(model, b, what)))


def rank_share_lost(layer: Any) -> float:
    """The share of a decomposed layer's rank that was cut: 1 - sum(ranks) / sum(full ranks)."""
    full = sum(layer.full_ranks)
    return 1.0 - sum(layer.ranks) / full if full else 0.0


def collapse_warning(check: OutputCheck, layers: Sequence[Any], min_agreement: float) -> str | None:
    """One line when the decomposed model agrees with the original on fewer than ``min_agreement`` of the
    predictions: the layers that lost the largest share of their rank, and what to try. None otherwise."""
    if check.agreement is None or check.agreement >= min_agreement:
        return None
    worst = sorted(layers, key=rank_share_lost, reverse=True)[:3]
    named = ", ".join(f"{layer.name} ({'+'.join(map(str, layer.full_ranks))} -> {'+'.join(map(str, layer.ranks))})"
                      for layer in worst)
    patterns = ",".join(layer.name for layer in worst)
    return (f"the decomposed model agrees with the original on {100 * check.agreement:.1f} % of predictions "
            f"(rank.min_agreement={min_agreement:g}; {check.describe()}): it is likely destroyed. Cut the most: "
            f"{named}. Try a lower rank.ratio, rank.policy=energy, rank.exclude=[{patterns}], or task=advise; "
            "low-rank decomposition suits layers that are not already thin")
