"""A layer's original and candidate ranks timed on the run's device, as the run executes them, and kept on disk.

Each is timed alone (:func:`lrd_exp.timing.layer.time_module`) at the layer's real activation shape, batch, memory
format and precision (the dtype of a ``*-true`` precision, autocast for a ``*-mixed`` one) and, with
``compile=True``, compiled. Timings are cached on disk, keyed by everything that moves them (device, precision,
compile mode, layer geometry, batch, ...), so sweeps and later runs do not re-measure. ``rank.policy=optimized``
(:mod:`lrd_exp.decompose.search`) and ``rank.allocation``'s time budgets read them.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lrd_exp.config.values import canonical_precision
from lrd_exp.decompose.cache import TableCache
from lrd_exp.decompose.layers import SVDConv1x1, SVDLinear, Tucker2Conv
from lrd_exp.decompose.plan import LayerPlan, Ranks
from lrd_exp.decompose.registry import is_linear, layer_bias
from lrd_exp.devices.allocator import malloc_mode
from lrd_exp.devices.resolve import DeviceInfo, resolve_device
from lrd_exp.timing.layer import time_module
from lrd_exp.timing.steps import cast_dtype, precision_dtypes

Timer = Callable[[LayerPlan, Ranks], float]


def rank_key(ranks: Ranks) -> str:
    return "original" if ranks is None else "x".join(map(str, ranks))


def _candidate_layer(plan: LayerPlan, ranks: Ranks, device: torch.device, channels_last: bool,
                     dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of the plan's layer (``ranks`` None), or a factorized layer of its shape at ``ranks``."""
    m = copy.deepcopy(plan.module).to(device)
    if ranks is None:
        module = m
    elif is_linear(m):
        module = SVDLinear.like(m, ranks[0])
    elif plan.kind == "svd":
        module = SVDConv1x1.like(m, ranks[0])
    else:
        module = Tucker2Conv.like(m, ranks[0], ranks[1])
    module = module.to(device=device, dtype=dtype)
    if channels_last and not is_linear(m):
        module = module.to(memory_format=torch.channels_last)
    return module


def time_layer(plan: LayerPlan, ranks: Ranks, *, batch_size: int, device: DeviceInfo, precision: str,
               objective: str, channels_last: bool = False, warmup: int = 3, steps: int = 10,
               compile: bool = False) -> float:
    """Median seconds of the layer (dense when ``ranks`` is None) at its real activation shape.

    Module and input are cast to the dtype of a ``*-true`` precision (as the timed training step does) and
    run under autocast for a ``*-mixed`` one; ``compile=True`` times ``torch.compile(module)``, the warm-up
    absorbing the compilation. A dtype or op the device lacks raises, naming the layer and precision.
    """
    if plan.in_shape is None:
        raise ValueError(f"layer {plan.name}: no activation shape recorded; pass example_input to decompose_model")
    precision = canonical_precision(precision)
    dev = device.torch_device
    dtype = cast_dtype(precision) or torch.float32
    try:
        module = _candidate_layer(plan, ranks, dev, channels_last, dtype)
        x = torch.randn(batch_size, *plan.in_shape, device=dev, dtype=dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return time_module(module, x, precision=precision, objective=objective, warmup=warmup, steps=steps,
                           compile=compile, device=device)
    except RuntimeError as e:
        raise RuntimeError(f"rank search: timing layer {plan.name} ({type(plan.module).__name__}, ranks "
                           f"{rank_key(ranks)}) at precision={precision}{', compiled' if compile else ''} on "
                           f"{device.name} failed: {e}") from e


class TimingCache(TableCache):
    """One JSON file per (device, precision, geometry, batch, objective) key: rank -> median seconds.

    The key also holds what else moves a timing: the dtype and autocast dtype the precision implies, compile
    mode, warm-up and step counts, layout, torch version and the host allocator mode (`device.malloc`: glibc's
    defaults re-fault large CPU buffers every step), so a changed setting re-measures.
    """

    @staticmethod
    def key(plan: LayerPlan, *, device_name: str, precision: str, batch_size: int, objective: str,
            channels_last: bool, compile: bool = False, warmup: int | None = None, steps: int | None = None
            ) -> str:
        m = plan.module
        geometry = {"type": type(m).__name__, "in": plan.n_in, "out": plan.n_out, "in_shape": plan.in_shape,
                    "bias": layer_bias(m) is not None}
        if isinstance(m, nn.Conv2d):
            geometry.update(k=m.kernel_size, s=m.stride, p=m.padding, d=m.dilation)
        precision = canonical_precision(precision)
        amp, cast = precision_dtypes(precision)
        spec = {"device": device_name, "precision": precision, "dtype": str(cast or torch.float32),
                "autocast": str(amp), "compile": bool(compile), "warmup": warmup, "steps": steps,
                "batch": batch_size, "objective": objective, "channels_last": channels_last, "geometry": geometry,
                "torch": torch.__version__, "malloc": malloc_mode()}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


class LayerTimer:
    """Times a layer's original and candidates: from the cache where it has them, else measured (or ``timer``).

    ``timer(plan, ranks_or_None) -> seconds`` replaces the device measurement (tests, custom cost models) and
    keeps nothing on disk; ``precision`` and ``compile`` time each candidate as the run executes it.
    """

    def __init__(self, *, objective: str = "train", batch_size: int = 32, device: DeviceInfo | None = None,
                 precision: str = "32-true", channels_last: bool = False, cache_dir: str | None = None,
                 warmup: int = 3, steps: int = 10, timer: Timer | None = None, compile: bool = False) -> None:
        self.cache, self.timer = TimingCache(None if timer is not None else cache_dir), timer
        self.settings: dict[str, Any] = dict(
            device=device or resolve_device("cpu"), precision=canonical_precision(precision), batch_size=batch_size,
            objective=objective, channels_last=channels_last, warmup=warmup, steps=steps, compile=compile)

    @property
    def stats(self) -> dict[str, int]:
        return {"timings_measured": self.cache.misses, "timings_cached": self.cache.hits}

    def __call__(self, plan: LayerPlan, cands: list[tuple[int, ...]]) -> dict[Ranks, float]:
        s = self.settings
        key = TimingCache.key(plan, device_name=s["device"].name, precision=s["precision"],
                              batch_size=s["batch_size"], objective=s["objective"], channels_last=s["channels_last"],
                              compile=s["compile"], warmup=s["warmup"], steps=s["steps"])
        table = self.cache.load(key)
        times: dict[Ranks, float] = {}
        for ranks in [None, *cands]:
            k = rank_key(ranks)
            if k in table:
                self.cache.hits += 1
            else:
                self.cache.misses += 1
                table[k] = self.timer(plan, ranks) if self.timer is not None else time_layer(plan, ranks, **s)
            times[ranks] = table[k]
        self.cache.save(key, table)
        return times


def measure_times(plans: Sequence[LayerPlan], candidates: dict[str, list[tuple[int, ...]]], **timing: Any
                  ) -> tuple[dict[str, dict[Ranks, float]], dict[str, int]]:
    """Per layer, seconds of the dense layer (None) and of each candidate, timed as ``rank.policy=optimized`` times
    them (same cache; ``timing``: :class:`LayerTimer`'s keywords); and the cache statistics. What
    ``rank.allocation`` spends a time budget by."""
    measure = LayerTimer(**timing)
    times = {p.name: measure(p, candidates[p.name]) for p in plans if p.name in candidates}
    return times, measure.stats
