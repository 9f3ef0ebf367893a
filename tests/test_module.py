"""The classifier's optimizer schedule: linear warm-up then cosine, stepped per batch."""

from __future__ import annotations

import math
import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrd_exp.module import Classifier


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


def test_step_throughput_uses_per_epoch_medians():
    from types import SimpleNamespace

    from lrd_exp.measure import StepThroughput

    speed = StepThroughput(skip=0)
    # epoch 0: steps of 0.1 s with one 5 s stall (a median ignores it); epoch 1: 0.05 s steps
    speed.step_times = [0.1, 0.1, 5.0, 0.1, 0.05, 0.05, 0.05, 0.05]
    speed.batch_sizes = [10] * 8
    speed.epochs = [0, 0, 0, 0, 1, 1, 1, 1]
    assert speed.images_per_s == pytest.approx(10 / 0.075)
    assert StepThroughput().images_per_s is None
    # and the callback records per epoch in a real loop
    trainer = SimpleNamespace(current_epoch=3, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module = SimpleNamespace(log=lambda *a, **k: None)
    live = StepThroughput(skip=1)
    live.on_train_epoch_start(trainer, module)
    for i in range(4):
        live.on_train_batch_end(trainer, module, None, (torch.zeros(5, 1), None), i)
    assert len(live.step_times) == 3 and live.epochs == [3, 3, 3] and live.batch_sizes == [5, 5, 5]


def test_step_throughput_overhead_share_is_the_wait_before_each_step(monkeypatch):
    from types import SimpleNamespace

    import lrd_exp.measure as M

    clock = iter([0.0, 0.03, 0.10, 0.13, 0.20, 0.23, 0.30])  # end, then (start, end) pairs: 30 ms wait, 70 ms step
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(current_epoch=0, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    module = SimpleNamespace(log=lambda *a, **k: None)
    live = M.StepThroughput(skip=0)
    live.on_train_epoch_start(trainer, module)
    batch = (torch.zeros(5, 1), None)
    live.on_train_batch_end(trainer, module, None, batch, 0)
    for i in range(1, 4):
        live.on_train_batch_start(trainer, module, batch, i)
        live.on_train_batch_end(trainer, module, None, batch, i)
    assert live.step_times == pytest.approx([0.1, 0.1, 0.1])
    assert live.overhead_share == pytest.approx(0.3)
    assert M.StepThroughput().overhead_share is None


class _SlowDigits(torch.utils.data.Dataset):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.x, self.y = torch.randn(24, 3, 8, 8), torch.randint(0, 3, (24,))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.x[i], self.y[i]


def test_step_throughput_shows_a_slow_data_loader_in_a_real_loop():
    from lrd_exp.measure import StepThroughput

    shares = {}
    for delay in (0.0, 0.02):  # 20 ms per sample = 160 ms per batch of 8, against a step of a few ms
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        module = Classifier(model, num_classes=3, optim={"name": "sgd", "lr": 0.1, "scheduler": "none"})
        speed = StepThroughput(skip=0)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[speed],
                             limit_val_batches=0)
        trainer.fit(module, DataLoader(_SlowDigits(delay), batch_size=8))
        shares[delay] = speed.overhead_share
    assert shares[0.02] > 0.5 and shares[0.02] > shares[0.0]


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
