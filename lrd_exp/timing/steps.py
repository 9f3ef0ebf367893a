"""A training step and an inference pass, prepared once and timed with device synchronisation.

The framework's speed claims are ratios (decomposed vs original) measured in the same process, after
warm-up, with device synchronisation around every timed step, over several steps; the median is the
headline and min/max the spread. Timed work runs on a deep copy of the model, so the caller's model
(weights, BatchNorm statistics, grads, train/eval mode, requires_grad) is exactly as it was afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrd_exp.batches import Batch, batch_size_of, feed, first_tensor, map_tensors
from lrd_exp.config.values import PRECISIONS, canonical_precision
from lrd_exp.devices.resolve import DeviceInfo, synchronize

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

@dataclass
class Timing:
    """Per-step wall times of a timed loop; ``batch_size`` turns them into images/s."""

    median_s: float
    min_s: float
    max_s: float
    times_s: list[float] = field(default_factory=list)
    batch_size: int = 1

    @property
    def ips(self) -> float:
        """Images (samples) per second at the median step time."""
        return self.batch_size / self.median_s if self.median_s > 0 else math.inf

    @property
    def ips_min(self) -> float:
        """Images per second of the slowest step (lower end of the spread)."""
        return self.batch_size / self.max_s if self.max_s > 0 else math.inf

    @property
    def ips_max(self) -> float:
        """Images per second of the fastest step (upper end of the spread)."""
        return self.batch_size / self.min_s if self.min_s > 0 else math.inf

    def quantile_s(self, q: float) -> float:
        """A quantile of the step times (0.5: the median, 0.9: the 90th percentile), linear interpolation."""
        times = sorted(self.times_s) or [self.median_s]
        pos = q * (len(times) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return times[lo] + (times[hi] - times[lo]) * (pos - lo)

    def images_per_s(self, batch_size: int | None = None) -> float:
        """Throughput at the median for a given batch size (default: the measured one)."""
        b = self.batch_size if batch_size is None else batch_size
        return b / self.median_s if self.median_s > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for a result row."""
        d = asdict(self)
        d.update(ips=self.ips, ips_min=self.ips_min, ips_max=self.ips_max)
        return d


def time_fn(
    fn: Callable[[], Any],
    *,
    warmup: int,
    steps: int,
    sync: Callable[[], None],
    batch_size: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    min_time_s: float = 0.0,
    max_steps: int | None = None,
) -> Timing:
    """Time ``fn`` per call: ``warmup`` untimed calls, then ``steps`` calls each bracketed by ``sync``.

    Synchronising before the clock starts keeps earlier queued work out of the step; synchronising
    before it stops makes an asynchronous device's step count fully. ``min_time_s`` keeps timing past
    ``steps`` until that much step time is collected (at most ``max_steps``, default 50 x ``steps``): a
    fast step needs many samples for a median that repeats on a noisy machine.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if min_time_s < 0:
        raise ValueError(f"min_time_s must be >= 0, got {min_time_s}")
    for _ in range(warmup):
        fn()
    cap = max(steps, max_steps if max_steps is not None else 50 * steps)
    times: list[float] = []
    while len(times) < steps or (sum(times) < min_time_s and len(times) < cap):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return Timing(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        times_s=times,
        batch_size=batch_size,
    )


# --------------------------------------------------------------------------------------------- helpers




def precision_dtypes(precision: Any) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(autocast dtype, cast dtype) of a precision flag or alias: the precision table as torch dtypes."""
    amp, cast = PRECISIONS[canonical_precision(precision)]
    return (getattr(torch, amp) if amp else None), (getattr(torch, cast) if cast else None)


def eval_forward(model: nn.Module, x: Batch) -> Any:
    """One forward in eval mode without autograd (e.g. to record shapes with hooks) of a tensor, tuple or dict
    input; every module's own mode is restored afterwards, and no BatchNorm statistic or random number of the
    caller's run is touched."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return feed(model, x)
    finally:
        for m, mode in modes.items():
            m.train(mode)


def cast_dtype(precision: Any) -> torch.dtype | None:
    """The dtype a ``*-true`` precision casts model and inputs to; None keeps float32 (autocast or not)."""
    return precision_dtypes(precision)[1]


def sync_for(device: DeviceInfo | None, torch_device: torch.device) -> Callable[[], None]:
    """What waits for ``torch_device``'s queued work: the resolved device's own wait when there is one."""
    if device is not None:
        return device.synchronize
    return lambda: synchronize(torch_device)


def prepared_copy(
    model: nn.Module,
    tensors: Iterable[Batch | None],
    *,
    precision: str,
    channels_last: bool,
    device: DeviceInfo | None,
) -> tuple[nn.Module, list[Batch | None], torch.device]:
    """Deep-copy the model and move copy and inputs (tensors, or tuple / dict batches) to the measuring device,
    layout and dtype."""
    tensors = list(tensors)
    first = first_tensor(next(t for t in tensors if t is not None))
    torch_device = device.torch_device if device is not None else first.device
    cast = cast_dtype(precision)
    work = copy.deepcopy(model).to(torch_device)
    if cast is not None:
        work = work.to(cast)
    if channels_last:
        work = work.to(memory_format=torch.channels_last)

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch_device)
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        if channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return work, [None if t is None else map_tensors(t, place) for t in tensors], torch_device


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    dtype = precision_dtypes(precision)[0]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output (tensor, or the first element of a tuple/list as timm returns)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    return out


def default_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum, as in the paper's fine-tuning: the optimizer state costs what it costs in training."""
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9)


def make_train_step(
    model: nn.Module,
    x: Batch,
    y: torch.Tensor,
    *,
    optimizer_factory: OptimizerFactory | None = None,
    precision: str = "32-true",
) -> Callable[[], None]:
    """One training step on ``model`` in place: forward, cross-entropy, backward, optimizer step.

    Only parameters with ``requires_grad`` reach the optimizer, so a frozen factor gets no update
    (no momentum, no weight decay) and no weight gradient. Used by :func:`prepare_train_step` on a copy.
    """
    precision = canonical_precision(precision)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (optimizer_factory or default_optimizer)(params) if params else None
    device_type = first_tensor(x).device.type
    scaler = None
    if precision == "16-mixed" and device_type in ("cuda", "npu"):
        scaler = torch.amp.GradScaler(device_type)

    def step() -> None:
        with autocast(precision, device_type):
            loss = F.cross_entropy(logits_of(feed(model, x)), y)
        if not loss.requires_grad:  # everything frozen: the forward is the whole step
            return
        if scaler is not None:
            scaler.scale(loss).backward()
            if optimizer is not None:
                scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if optimizer is not None:
                optimizer.step()
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)

    return step


# --------------------------------------------------------------------------------------------- throughput


@dataclass
class PreparedStep:
    """A ready-to-time step on its own copy of a model: timed again and again (interleaved rounds) without
    re-copying, so only the first round pays for allocation and compilation warm-up."""

    fn: Callable[[], None]
    sync: Callable[[], None]
    batch_size: int

    def time(self, *, warmup: int, steps: int, min_time_s: float = 0.0) -> Timing:
        return time_fn(self.fn, warmup=warmup, steps=steps, sync=self.sync, batch_size=self.batch_size,
                       min_time_s=min_time_s)


def prepare_train_step(
    model: nn.Module,
    x: Batch,
    y: torch.Tensor,
    *,
    optimizer_factory: OptimizerFactory | None = None,
    precision: str = "32-true",
    channels_last: bool = False,
    compile: bool = False,
    device: DeviceInfo | None = None,
) -> PreparedStep:
    """A training step (fwd, loss, bwd, optimizer step) on a deep copy of ``model`` in train mode.

    The copy keeps ``requires_grad`` as it is, so frozen parameters are measured as frozen; the caller's
    model is untouched. ``device=None`` measures where ``x`` lives. ``compile=True`` wraps the copy in
    ``torch.compile``; warm-up steps absorb the compilation.
    """
    precision = canonical_precision(precision)
    work, (xw, yw), torch_device = prepared_copy(
        model, (x, y), precision=precision, channels_last=channels_last, device=device
    )
    work.train()
    run = torch.compile(work) if compile else work
    step = make_train_step(run, xw, yw, optimizer_factory=optimizer_factory, precision=precision)
    return PreparedStep(step, sync_for(device, torch_device), batch_size_of(x))


def prepare_inference(
    model: nn.Module,
    x: Batch,
    *,
    precision: str = "32-true",
    channels_last: bool = False,
    compile: bool = False,
    device: DeviceInfo | None = None,
) -> PreparedStep:
    """A forward pass of a deep copy of ``model`` in eval mode under ``torch.inference_mode``; ``x`` is a tensor,
    a tuple (``model(*x)``) or a dict (``model(**x)``)."""
    precision = canonical_precision(precision)
    work, (xw,), torch_device = prepared_copy(
        model, (x,), precision=precision, channels_last=channels_last, device=device
    )
    work.eval()
    run = torch.compile(work) if compile else work
    device_type = torch_device.type

    def forward() -> None:
        with torch.inference_mode(), autocast(precision, device_type):
            feed(run, xw)

    return PreparedStep(forward, sync_for(device, torch_device), batch_size_of(x))
