"""Watching layers during a forward: one context manager that hooks named modules and always unhooks them.

Shapes for FLOP counts (surgery), calibration inputs (calibration), each factorized layer's input for timing
(deploy.merge) and each factor's output positions (freezing) are all read this way. The watched tensor is the
layer's first input, positional or keyword, so a layer called as ``layer(input=x)`` is watched too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

#: fn(name, module, first input, output); the output is None for a hook that runs before the layer
Watcher = Callable[[str, nn.Module, torch.Tensor, Any], None]


def first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The tensor a layer is called on: its first positional argument, else its first keyword argument."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


@contextlib.contextmanager
def watch(modules: Mapping[str, nn.Module], fn: Watcher, *, before: bool = False) -> Iterator[None]:
    """Call ``fn`` on every call of each named module during the block (before the layer runs with ``before``,
    after it otherwise); the hooks are removed however the block ends."""

    def hook(name: str, module: nn.Module) -> Any:
        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            fn(name, module, first_input(args, kwargs), None)  # returns None: the inputs stay as they are

        def post(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            fn(name, module, first_input(args, kwargs), out)

        if before:
            return module.register_forward_pre_hook(pre, with_kwargs=True)
        return module.register_forward_hook(post, with_kwargs=True)

    handles = [hook(name, module) for name, module in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
