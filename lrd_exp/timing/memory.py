"""How much memory one training step needs, per model and freeze state.

On CUDA / NPU it is the allocator's peak during a step (what the device must hold). On the CPU there is no such
peak to read, so the bytes are counted: parameters, gradients of the trainable parameters, optimizer state, and
the activations autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``). Freezing shows in
the last three: a frozen factor has no gradient, no optimizer state, and its input need not be saved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrd_exp.batches import feed, first_tensor
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.timing.steps import (
    OptimizerFactory,
    autocast,
    canonical_precision,
    default_optimizer,
    logits_of,
    prepared_copy,
)

MIB = float(1 << 20)
KINDS = ("allocator peak", "counted")


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _accelerator(device_type: str) -> Any:
    return getattr(torch, device_type, None) if device_type in ("cuda", "npu") else None


def training_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> tuple[float, str]:
    """(MiB of one training step, how it was measured: 'allocator peak' or 'counted'); see :func:`memory_parts`."""
    parts = memory_parts(model, x, y, **kwargs)
    kind = KINDS[0] if "peak" in parts else KINDS[1]
    return sum(parts.values()) / MIB, kind


def memory_parts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 optimizer_factory: OptimizerFactory | None = None, precision: str = "32-true",
                 channels_last: bool = False, device: DeviceInfo | None = None) -> dict[str, int]:
    """Bytes of one training step on a copy of ``model``: ``{"peak"}`` on CUDA / NPU (the allocator's peak above
    what was on the device before the copy: its weights, gradients, optimizer state and activations), else
    ``{"params", "grads",
    "optimizer_state", "activations"}`` (each tensor once; a weight autograd saves counts as a parameter).

    The copy keeps ``requires_grad`` as it is, so a freeze state is measured as frozen; the caller's model is
    untouched. The step is the benchmark's: forward, cross-entropy, backward, optimizer step.
    """
    precision = canonical_precision(precision)
    target = device.torch_device if device is not None else first_tensor(x).device
    acc = _accelerator(target.type)
    if acc is not None:
        acc.synchronize()
        resident = acc.memory_allocated(target)  # other models already on the device are not this step's
    work, (xw, yw), torch_device = prepared_copy(model, (x, y), precision=precision, channels_last=channels_last,
                                            device=device)
    work.train()
    params = [p for p in work.parameters() if p.requires_grad]
    optimizer = (optimizer_factory or default_optimizer)(params) if params else None
    saved: dict[tuple[int, int], int] = {}
    param_ptrs = {p.data_ptr() for p in work.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), _bytes(t))
        if t.data_ptr() not in param_ptrs:  # a weight saved for backward is already counted as a parameter
            saved[key] = key[1]
        return t

    def step(count: bool) -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else _null():
            with autocast(precision, torch_device.type):
                loss = F.cross_entropy(logits_of(feed(work, xw)), yw)
        if loss.requires_grad:
            loss.backward()
            if optimizer is not None:
                optimizer.step()

    if acc is not None:
        step(count=False)  # optimizer state and allocator caches exist from here on, as in training
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        acc.synchronize()
        acc.reset_peak_memory_stats(torch_device)
        step(count=False)
        acc.synchronize()
        return {"peak": int(acc.max_memory_allocated(torch_device) - resident)}
    step(count=True)
    state = sum(_bytes(t) for s in (optimizer.state.values() if optimizer is not None else ())
                for t in s.values() if torch.is_tensor(t))
    return {"params": sum(_bytes(p) for p in work.parameters()), "grads": sum(_bytes(p) for p in params),
            "optimizer_state": state, "activations": sum(saved.values())}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
