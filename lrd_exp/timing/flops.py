"""FLOPs of a forward pass or a training step, counted on the real modules in their freeze state.

Counted by executing the model under ``FlopCounterMode``, so a frozen parameter (no ``requires_grad``) costs no
weight-gradient FLOPs, exactly as autograd skips it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrd_exp.batches import Batch, feed, map_tensors, tensors
from lrd_exp.timing.steps import logits_of


def _conv_flops(x_shape: Any, w_shape: Any, out_shape: Any, transposed: bool) -> int:
    """One convolution: 2 x (output positions, or input positions when transposed) x weight elements per sample.

    The weight is (out, in / groups, k...) or, transposed, (in, out / groups, k...), so groups are already in it.
    """
    positions = (x_shape if transposed else out_shape)[2:]
    return 2 * int(x_shape[0]) * math.prod(positions) * math.prod(w_shape)


def conv_backward_flops(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any, _padding: Any,
                        _dilation: Any, transposed: bool, _output_padding: Any, _groups: Any, output_mask: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    """``aten.convolution_backward``: grad-input and grad-weight each cost one forward, each only when computed.

    torch's own formula counts a grouped convolution's weight gradient as if it were dense (groups times too
    much: a depthwise conv's backward dozens of forwards).
    """
    fwd = _conv_flops(x_shape, w_shape, grad_out_shape, transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flops}


def count_flops(model: nn.Module, x: Batch, *, train: bool, y: torch.Tensor | None = None) -> int:
    """FLOPs of one forward (``train=False``) or one training step's forward + backward (``train=True``) on ``x``:
    a tensor, a tuple (``model(*x)``) or a dict (``model(**x)``).

    Counts the real execution under ``FlopCounterMode`` (a multiply-add is 2 FLOPs): with ``train=True``
    backward computes only the gradients ``loss.backward()`` would, so a frozen weight adds no weight-gradient
    FLOPs and an input that needs no grad adds no input-gradient FLOPs for the first layer (one that does, does).
    Convolution backward is counted by :func:`conv_backward_flops`: torch's own count is wrong for grouped and
    depthwise convs. The optimizer step is not counted. The model is left as it was: grads, buffers (BatchNorm
    statistics) and every module's own mode are restored, and for ``train=False`` the forward runs in eval mode
    without autograd. The random state is not: a caller inside a training run forks it (dropout draws from it
    in a ``train=True`` count).
    """
    saved_grads = {p: p.grad for p in model.parameters()}
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    try:
        if train:
            # an input that needs grad enters as a view: the counter's module hooks fail on a leaf that
            # autograd.grad() is asked for
            x_in = map_tensors(x, lambda t: t.view_as(t) if t.requires_grad else t)
            with counter:
                logits = logits_of(feed(model, x_in))
                target = (
                    y
                    if y is not None
                    else torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
                )
                loss = F.cross_entropy(logits, target)
                if loss.requires_grad:
                    # gradients go to fresh tensors, not into .grad of the caller's parameters (or input)
                    wanted = [p for p in model.parameters() if p.requires_grad]
                    # backward() would compute the inputs' gradients too
                    wanted += [t for t in tensors(x) if t.requires_grad]
                    torch.autograd.grad(loss, wanted, allow_unused=True)
        else:
            model.eval()
            with torch.no_grad(), counter:
                feed(model, x)
    finally:
        for m, mode in modes.items():  # each module its own mode (a BatchNorm kept in eval stays there)
            m.train(mode)
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
        for p, g in saved_grads.items():
            p.grad = g
    return int(counter.get_total_flops())


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); ``trainable_only`` counts those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
