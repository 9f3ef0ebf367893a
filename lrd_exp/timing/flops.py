"""FLOPs of a forward pass or a training step, counted on the real modules in their freeze state.

Counted by executing the model under ``FlopCounterMode``, so a frozen parameter (no ``requires_grad``) costs no
weight-gradient FLOPs, exactly as autograd skips it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrd_exp.timing.steps import logits_of


def count_flops(model: nn.Module, x: torch.Tensor, *, train: bool, y: torch.Tensor | None = None) -> int:
    """FLOPs of one forward (``train=False``) or one training step's forward + backward (``train=True``).

    Counts the real execution under ``FlopCounterMode`` (a multiply-add is 2 FLOPs): with ``train=True``
    backward computes only the gradients autograd needs, so a frozen weight adds no weight-gradient FLOPs
    and an input that needs no grad adds no input-gradient FLOPs for the first layer. The optimizer step
    is not counted. The model is left as it was: grads and buffers (BatchNorm statistics) are restored,
    and for ``train=False`` the forward runs in eval mode without autograd.
    """
    saved_grads = {p: p.grad for p in model.parameters()}
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        if train:
            with counter:
                logits = logits_of(model(x))
                target = (
                    y
                    if y is not None
                    else torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
                )
                loss = F.cross_entropy(logits, target)
                if loss.requires_grad:
                    # gradients go to fresh tensors, not into .grad of the caller's parameters
                    params = [p for p in model.parameters() if p.requires_grad]
                    torch.autograd.grad(loss, params, allow_unused=True)
        else:
            model.eval()
            with torch.no_grad(), counter:
                model(x)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, v in saved_buffers:
                b.copy_(v)
        for p, g in saved_grads.items():
            p.grad = g
    return int(counter.get_total_flops())


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); ``trainable_only`` counts those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def predicted_speedup(flops_original: float, flops_new: float) -> float:
    """The speed-up FLOPs alone predict (original / new): what the measured ratio is compared with."""
    if flops_new <= 0:
        raise ValueError(f"flops_new must be > 0, got {flops_new}")
    return float(flops_original) / float(flops_new)
