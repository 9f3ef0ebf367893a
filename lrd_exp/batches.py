"""A model input in any of the forms the API takes: a tensor (``model(x)``), a tuple or list (``model(*x)``) or a
dict (``model(**x)``, as a Hugging Face tokenizer returns it).

Every place that takes an example input or batches (decompose, calibration, merge, export, timing, freezing)
reads it through these helpers, so a form that works in one works in all. Needs torch alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

Batch = Any  # torch.Tensor | tuple | list | dict, nested


def tensors(batch: Batch) -> Iterator[torch.Tensor]:
    """Every tensor in the batch, depth first in its own order."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from tensors(v)


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], Any]) -> Batch:
    """The batch with ``fn`` applied to every tensor in it; the structure (dict keys, tuple or list) is kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def first_tensor(batch: Batch) -> torch.Tensor:
    """The batch's first tensor (its device is where the batch lives); ValueError when it holds none."""
    for value in tensors(batch):
        return value
    raise ValueError(f"a batch holds no tensor ({type(batch).__name__})")


def batch_size_of(batch: Batch) -> int:
    """Samples in a batch: the leading size of its first tensor."""
    value = first_tensor(batch)
    return int(value.shape[0]) if value.dim() else 1


def first_samples(batch: Batch, n: int) -> Batch:
    """The first ``n`` samples of every tensor that has the batch's leading size."""
    size = batch_size_of(batch)
    return map_tensors(batch, lambda t: t[:n] if t.dim() and t.shape[0] == size else t)


def to_device(batch: Batch, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Batch:
    """The batch on ``device``; with ``dtype`` its floating tensors cast to it (token ids and masks keep theirs)."""
    return map_tensors(batch, lambda t: t.to(device, dtype if dtype is not None and t.is_floating_point() else None))


def shapes(batch: Batch) -> str:
    """The batch's shapes as one short string, for error messages."""
    if isinstance(batch, torch.Tensor):
        return "x".join(map(str, batch.shape)) or "scalar"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {shapes(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(shapes(v) for v in batch) + ")"
    return type(batch).__name__


def as_call(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) of the call the batch stands for: what ``torch.export`` and the ONNX exporter take."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def feed(model: nn.Module, batch: Batch) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``, as the batch's form says (nothing moved or cast)."""
    args, kwargs = as_call(batch)
    return model(*args, **kwargs)
