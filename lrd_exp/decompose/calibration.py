"""Calibration inputs: feeding them to any model, the input moments of its layers, and BatchNorm re-estimation.

A batch is a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``), so any torch model
runs, Hugging Face transformers included. Moments are uncentred, accumulated in float64, and subsampled to at most
``max_positions`` input positions per layer (tokens, or output pixels of a conv) so a large model calibrates in
seconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrd_exp.batches import Batch, batch_size_of, feed, first_samples, shapes, to_device
from lrd_exp.decompose.capture import watch
from lrd_exp.decompose.registry import is_linear

__all__ = ["Batch", "CalibrationError", "EvalModes", "Moments", "batch_size_of", "calibration_batches",
           "collect_moments", "collect_paired", "first_samples", "layer_positions", "recalibrate_bn", "run_batch",
           "shapes"]
#: positions (tokens, output pixels) sampled per layer over all calibration images; beyond it they are subsampled
MAX_POSITIONS = 8192
#: a single tensor given as ``calibration=`` is fed in chunks of this many samples
CHUNK = 32


class CalibrationError(ValueError):
    """Calibration inputs that do not fit the model, or activations that are not finite: one line says which."""


class _Stop(BaseException):
    """Raised by a hook once the layer being calibrated has seen its input: the rest of the forward is not needed."""


# ------------------------------------------------------------------------------------------------------- batches
def calibration_batches(calibration: torch.Tensor | Iterable[Batch], limit: int | None = None) -> list[Batch]:
    """``calibration=`` as a list of batches holding at most ``limit`` samples (a tensor is split into chunks)."""
    if calibration is None:
        return []
    if isinstance(calibration, torch.Tensor):
        calibration = list(calibration.split(CHUNK)) if calibration.dim() else [calibration]
    elif isinstance(calibration, Mapping):
        calibration = [calibration]
    out, seen = [], 0
    for batch in calibration:
        if limit is not None and seen >= limit:
            break
        n = batch_size_of(batch)
        if limit is not None and seen + n > limit:
            batch, n = first_samples(batch, limit - seen), limit - seen
        out.append(batch)
        seen += n
    if not out:
        raise CalibrationError("calibration: no batch given (an empty iterable)")
    return out


def run_batch(model: nn.Module, batch: Batch, what: str = "a calibration batch") -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` on the model's device; a failure is one line with the batch's
    shapes."""
    p = next(model.parameters(), None)
    if p is not None:
        batch = to_device(batch, p.device, p.dtype)
    try:
        return feed(model, batch)
    except (_Stop, CalibrationError):
        raise
    except Exception as exc:
        error = " ".join(str(exc).split())
        raise CalibrationError(f"the model failed on {what} of shapes {shapes(batch)}: {type(exc).__name__}: "
                               f"{error}") from exc


class EvalModes:
    """Eval mode (or BatchNorm-only train mode) and no autograd for a pass; every module's own mode restored."""

    def __init__(self, model: nn.Module, train_bn: bool = False) -> None:
        self.model, self.train_bn = model, train_bn

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        if self.train_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        torch.set_grad_enabled(self.grad)
        for m, mode in self.modes.items():
            m.train(mode)


# ------------------------------------------------------------------------------------------------------ moments
def layer_positions(module: nn.Module, x: torch.Tensor, per_sample: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """A layer's input as samples x positions x features: tokens of a linear layer, im2col patches of a conv (in
    ``F.unfold``'s order: channel, then kernel row and column). With ``per_sample``, at most that many positions of
    each sample, drawn at random: a conv's patches are gathered only there, never unfolded whole."""
    if is_linear(module):
        pos = x.reshape(x.shape[0], -1, x.shape[-1])
        return _subsample(pos, per_sample, generator)
    pad = list(module._reversed_padding_repeated_twice)  # any padding: ints, "same" (uneven too), "valid"
    if any(pad):
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    n, c, h, w = x.shape
    h_out, w_out = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    total = h_out * w_out
    if per_sample is None or per_sample >= total:
        idx = torch.arange(total, device=x.device).expand(n, total)
    else:
        idx = torch.rand(n, total, generator=generator, device="cpu").argsort(1)[:, :per_sample].to(x.device)
    rows, cols = (idx // w_out) * sh, (idx % w_out) * sw  # n x P: the patch's top-left corner
    batch = torch.arange(n, device=x.device)[:, None]
    taps = [x[batch, :, rows + a * dh, cols + b * dw] for a in range(kh) for b in range(kw)]  # each n x P x c
    return torch.stack(taps, dim=-1).reshape(n, idx.shape[1], c * kh * kw)


def _subsample(pos: torch.Tensor, per_sample: int | None, generator: torch.Generator | None) -> torch.Tensor:
    n, p, d = pos.shape
    if per_sample is None or p <= per_sample:
        return pos
    idx = torch.rand(n, p, generator=generator, device="cpu").argsort(1)[:, :per_sample].to(pos.device)
    return pos.gather(1, idx[:, :, None].expand(-1, -1, d))


class Moments:
    """The uncentred second moment of one layer's inputs (and, for sequential calibration, of the original model's
    inputs and their cross moment), over sampled positions. Rows are buffered so each Gram product is one large
    matrix multiply; products run in float32 (float64 inputs stay float64) and are summed in float64."""

    def __init__(self, per_sample: int) -> None:
        self.per_sample = per_sample
        self.positions = 0
        self._sums: dict[str, torch.Tensor] = {}
        self._rows: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._buffered = 0

    def sample(self, module: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x``'s positions for ``module``, subsampled to ``per_sample`` each, as rows."""
        pos = layer_positions(module, x, self.per_sample, generator)
        return pos.reshape(-1, pos.shape[-1])

    def add(self, x: torch.Tensor, original: torch.Tensor | None = None) -> None:
        self._rows.append((x, original))
        self._buffered += x.shape[0]
        self.positions += x.shape[0]
        if self._buffered >= max(2048, x.shape[1]):
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        dtype = torch.float64 if self._rows[0][0].dtype == torch.float64 else torch.float32
        x = torch.cat([r[0] for r in self._rows]).to(dtype)
        pairs = {"moment": (x, x)}
        if self._rows[0][1] is not None:
            o = torch.cat([r[1] for r in self._rows]).to(dtype)
            pairs.update(original=(o, o), cross=(o, x))
        for key, (a, b) in pairs.items():
            g = (a.T @ b).double()
            self._sums[key] = self._sums[key] + g if key in self._sums else g
        self._rows, self._buffered = [], 0

    def _get(self, key: str) -> torch.Tensor | None:
        self._flush()
        return self._sums.get(key)

    @property
    def moment(self) -> torch.Tensor | None:
        """X^ X^T^: the inputs of the model being fitted."""
        return self._get("moment")

    @property
    def original(self) -> torch.Tensor | None:
        """X X^T: the original model's inputs (paired mode)."""
        return self._get("original")

    @property
    def cross(self) -> torch.Tensor | None:
        """X X^T^ (paired mode)."""
        return self._get("cross")


def per_sample_positions(batches: Sequence[Batch], max_positions: int) -> int:
    return max(1, math.ceil(max_positions / max(1, sum(batch_size_of(b) for b in batches))))


def _check_finite(name: str, x: torch.Tensor) -> None:
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise CalibrationError(f"calibration: the input of layer {name!r} holds NaN or inf on the calibration "
                               "batches (the first such layer); check the model and the inputs' scale")


def collect_moments(model: nn.Module, layers: Mapping[str, nn.Module], batches: Sequence[Batch], *,
                    max_positions: int = MAX_POSITIONS, seed: int = 0) -> tuple[dict[str, Moments], list[str]]:
    """One pass over the batches: every layer's input moment, and the order in which the layers ran."""
    per_sample = per_sample_positions(batches, max_positions)
    moments = {name: Moments(per_sample) for name in layers}
    order: list[str] = []
    generator = torch.Generator()

    def add(name: str, module: nn.Module, x: torch.Tensor, _out: Any) -> None:
        _check_finite(name, x)
        if name not in order:
            order.append(name)
        moments[name].add(moments[name].sample(module, x.detach(), generator))

    with watch(layers, add, before=True), EvalModes(model):
        for i, batch in enumerate(batches):
            generator.manual_seed(seed * 100003 + i)
            run_batch(model, batch)
    return moments, order


def collect_paired(original: nn.Module, current: nn.Module, name: str, batches: Sequence[Batch], *,
                   max_positions: int = MAX_POSITIONS, seed: int = 0) -> Moments:
    """Sequential calibration of one layer: its inputs in the original model and in the partly decomposed one, at
    the same sampled positions (X X^T, X^ X^T^ and X X^T^). Each forward stops at the layer."""
    per_sample = per_sample_positions(batches, max_positions)
    moments, captured = Moments(per_sample), {}
    generator = torch.Generator()

    def grab(key: str) -> Any:
        def fn(_name: str, module: nn.Module, x: torch.Tensor, _out: Any) -> None:
            _check_finite(name, x)
            captured[key] = (module, x.detach())
            raise _Stop
        return fn

    watched = (watch({name: original.get_submodule(name)}, grab("original"), before=True),
               watch({name: current.get_submodule(name)}, grab("current"), before=True))
    with watched[0], watched[1], EvalModes(original), EvalModes(current):
        for i, batch in enumerate(batches):
            captured.clear()
            for model in (original, current):
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
            if len(captured) < 2:
                raise CalibrationError(f"calibration: layer {name!r} did not run on a calibration batch")
            generator.manual_seed(seed * 100003 + i)
            x_hat = moments.sample(*captured["current"], generator)
            generator.manual_seed(seed * 100003 + i)
            moments.add(x_hat, moments.sample(*captured["original"], generator))
    return moments


# ---------------------------------------------------------------------------------------------------- BatchNorm
def _tracking_batchnorms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics: what :func:`recalibrate_bn` changes."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has a BatchNorm that keeps running statistics (what :func:`recalibrate_bn` changes)."""
    return bool(_tracking_batchnorms(model))


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm's running statistics by state-dict key: ``model.load_state_dict(state,
    strict=False)`` puts them back."""
    return {f"{name}.{key}" if name else key: value.clone()
            for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for key, value in m.state_dict().items() if "running" in key or "tracked" in key}


def recalibrate_bn(model: nn.Module, batches: torch.Tensor | Iterable[Batch]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (EagleEye): the statistics are reset and
    recomputed as the plain average over the batches (momentum None) in train mode, with every other module in eval
    mode and no autograd. Returns the number of BatchNorm layers; momentum and modes are restored.

    Not ``torch.optim.swa_utils.update_bn``: that one puts the whole model in train mode (dropout, stochastic depth
    and a ViT's drop-path would change the statistics), records autograd graphs, feeds only the first element of a
    tuple batch and no dict, and leaves the statistics reset when a batch fails. Here a BatchNorm that no batch
    reached keeps its own statistics."""
    bns = _tracking_batchnorms(model)
    if not bns:
        return 0
    batches = calibration_batches(batches)
    saved = [(bn.momentum, {k: v.clone() for k, v in bn.state_dict().items() if "running" in k or "tracked" in k})
             for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: every batch counts the same
    try:
        with EvalModes(model, train_bn=True):
            for batch in batches:
                run_batch(model, batch)
    except BaseException:
        for bn, (_, state) in zip(bns, saved):  # a failed pass leaves the statistics as they were
            bn.load_state_dict(state, strict=False)
        raise
    finally:
        for bn, (momentum, _) in zip(bns, saved):
            bn.momentum = momentum
    for bn, (_, state) in zip(bns, saved):
        if int(bn.num_batches_tracked) == 0:  # not reached by the calibration inputs: keep its own statistics
            bn.load_state_dict(state, strict=False)
    return len(bns)
