"""One layer timed alone at one input: the rank search times each candidate so, and deployment times both forms of a
decomposed layer so (:mod:`lrd_exp.deploy.merge`). One loop, so the two agree on warm-up, steps, synchronisation,
precision and what a step is."""

from __future__ import annotations

import torch
from torch import nn

from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.timing.steps import autocast, sync_for, time_fn


def time_module(module: nn.Module, x: torch.Tensor, *, precision: str, objective: str = "inference", warmup: int,
                steps: int, compile: bool = False, device: DeviceInfo | None = None) -> float:
    """Median seconds of ``module(x)``: its training step (forward, backward of the output's sum), its forward under
    ``torch.inference_mode``, or the two summed (``objective``), each under autocast for a ``*-mixed`` precision.

    ``module`` and ``x`` are already on the device in the precision's dtype and layout; ``device`` (default:
    ``x``'s) says how to wait for it. ``x`` is made to require grad for a training step. ``compile=True`` times
    :func:`compiled` ``module``, the warm-up absorbing the compilation.
    """
    run = compiled(module) if compile else module
    sync, device_type = sync_for(device, x.device), x.device.type
    try:
        total = 0.0
        if objective in ("train", "both"):
            x.requires_grad_(True)

            def train() -> None:
                with autocast(precision, device_type):
                    out = run(x)
                out.float().sum().backward()
                x.grad = None
                for p in module.parameters():
                    p.grad = None

            total += time_fn(train, warmup=warmup, steps=steps, sync=sync).median_s
        if objective in ("inference", "both"):
            xi = x.detach()

            def infer() -> None:
                with torch.inference_mode(), autocast(precision, device_type):
                    run(xi)

            total += time_fn(infer, warmup=warmup, steps=steps, sync=sync).median_s
        return total
    finally:
        if compile:
            from torch._dynamo.eval_frame import remove_from_cache  # dynamo loads on first compile only

            remove_from_cache(module)


def compiled(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` with static shapes, as a fresh process would compile it first.

    Dynamo keeps compiled graphs per code object, and every layer of a class shares its ``forward``: timed one
    after another, candidates would pile up as recompiles of that one code (past ``recompile_limit`` they run
    eager), and the first change of input shape would make the next graph dynamic (automatic dynamic shapes).
    So each is compiled with ``dynamic=False`` and, once timed, :func:`time_module` evicts the entries of its
    ``forward`` (``remove_from_cache``): every candidate gets the static graph a fresh process would, and
    other compiled graphs of the process are kept (``torch._dynamo.reset()`` would drop them all).
    """
    return torch.compile(module, dynamic=False)
