"""Training memory on the CPU, counted: parameters, gradients, optimizer state and saved activations."""

from __future__ import annotations

import torch
from torch import nn

from lrd_exp.timing.memory import MIB, memory_parts, training_memory


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_the_parts_are_the_bytes_of_what_a_step_keeps():
    model = mlp()
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    params = (8 * 16 + 16 + 16 * 4 + 4) * 4  # float32
    sgd = memory_parts(model, x, y)  # default: SGD with momentum, one buffer per trainable parameter
    assert sgd["params"] == sgd["grads"] == sgd["optimizer_state"] == params
    assert sgd["activations"] >= x.numel() * 4 + 5 * 16 * 4  # the input of the first layer and of the second
    adamw = memory_parts(model, x, y, optimizer_factory=lambda p: torch.optim.AdamW(p, lr=1e-3))
    assert adamw["optimizer_state"] >= 2 * params  # two moments per parameter (and a step count)
    mib, kind = training_memory(model, x, y)
    assert kind == "counted" and mib == sum(sgd.values()) / MIB


def test_freezing_a_layer_saves_its_gradient_state_and_saved_input():
    model = mlp()
    x, y = torch.randn(5, 8), torch.randint(0, 4, (5,))
    before = memory_parts(model, x, y)
    for p in model[0].parameters():
        p.requires_grad_(False)
    after = memory_parts(model, x, y)
    frozen = (8 * 16 + 16) * 4
    assert after["params"] == before["params"]
    assert before["grads"] - after["grads"] == frozen and before["optimizer_state"] - after["optimizer_state"] == frozen
    assert after["activations"] <= before["activations"] - x.numel() * 4  # the input needs no saving now
    assert all(p.requires_grad is False for p in model[0].parameters())  # measured on a copy
    assert all(p.grad is None for p in model.parameters())
