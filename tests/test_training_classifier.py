"""The classifier: its optimizer (the benchmark builds the same), warm-up then cosine stepped per batch, layouts."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrd_exp.training.classifier import Classifier


class _RecordLR(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(optim: dict, epochs: int = 2, batches: int = 4) -> list[float]:
    torch.manual_seed(0)
    x, y = torch.randn(8 * batches, 6), torch.randint(0, 3, (8 * batches,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    module = Classifier(nn.Linear(6, 3), num_classes=3, optim=optim)
    rec = _RecordLR()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
                         limit_val_batches=0)
    trainer.fit(module, loader)
    return rec.lrs


def test_warmup_is_linear_then_cosine_to_zero():
    lrs = _fit({"name": "sgd", "lr": 0.4, "momentum": 0.0, "weight_decay": 0.0, "scheduler": "cosine",
                "warmup_epochs": 1}, epochs=3, batches=4)
    assert len(lrs) == 12
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # (k+1)/4 of the peak over the first epoch
    cosine = [0.2 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert lrs[4:] == pytest.approx(cosine)


def test_no_warmup_keeps_plain_cosine():
    lrs = _fit({"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "cosine"}, epochs=2, batches=4)
    assert lrs == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])


def test_warmup_with_constant_schedule():
    lrs = _fit({"name": "sgd", "lr": 0.2, "scheduler": "none", "warmup_epochs": 0.5}, epochs=2, batches=4)
    assert lrs == pytest.approx([0.1, 0.2] + [0.2] * 6)


def test_scheduler_none_without_warmup_is_constant():
    lrs = _fit({"name": "sgd", "lr": 0.2, "scheduler": "none"}, epochs=1, batches=4)
    assert lrs == pytest.approx([0.2] * 4)


class _Layouts(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        conv = pl_module.model[0]
        cl = torch.channels_last
        inputs: list[torch.Tensor] = []
        hook = conv.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        pl_module(batch[0])
        hook.remove()
        self.seen.append((inputs[0].is_contiguous(memory_format=cl), conv.weight.is_contiguous(memory_format=cl)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_training_layout(channels_last):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    params_before = list(model.parameters())
    module = Classifier(model, num_classes=3, optim={"name": "sgd", "lr": 0.1, "scheduler": "none"},
                        channels_last=channels_last)
    rec = _Layouts()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rec], limit_val_batches=0)
    before = model[0].weight.detach().clone()
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert rec.seen == [(channels_last, channels_last)] * 2
    assert list(model.parameters()) == params_before  # same Parameter objects: the optimizer trained them
    assert not torch.equal(model[0].weight.detach(), before)


def test_make_optimizer_names_and_errors():
    from lrd_exp.training.classifier import make_optimizer

    p = [nn.Parameter(torch.zeros(2))]
    sgd = make_optimizer(p, {"name": "sgd", "lr": 0.1, "momentum": 0.8, "weight_decay": 1e-4})
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    assert sgd.defaults["weight_decay"] == 1e-4
    assert isinstance(make_optimizer(p, {"name": "adamw", "lr": 1e-3}), torch.optim.AdamW)
    with pytest.raises(ValueError, match="trainer.*_optim.name='lion'"):
        make_optimizer(p, {"name": "lion"})
