"""The loop's own throughput (StepThroughput) and the benchmark probe between epochs: a paired, drift-free ratio."""

from __future__ import annotations

import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lrd_exp.timing.loop import (
    BenchProbe,
    StepThroughput,
    epoch_medians,
    fidelity_epochs,
    loop_fidelity,
    paired_fidelity,
)
from lrd_exp.training.classifier import Classifier

pytestmark = pytest.mark.usefixtures("single_thread")


def test_paired_fidelity_weights_each_epoch_like_the_loop():
    loop = {0: (10, 0.10), 1: (30, 0.05)}  # 10 steps of 100 ms, then 30 of 50 ms
    probe = {0: 0.09, 1: 0.04, 7: 0.001}  # epoch 7 has no loop steps: ignored
    probe_ips, ratio = paired_fidelity(loop, 64, probe, 64)
    loop_step = (10 * 0.10 + 30 * 0.05) / 40
    probe_step = (10 * 0.09 + 30 * 0.04) / 40
    assert probe_ips == pytest.approx(64 / probe_step)
    assert ratio == pytest.approx(probe_step / loop_step)
    assert paired_fidelity(loop, 64, {5: 0.1}, 64) == (None, None)
    assert paired_fidelity({}, 64, probe, 64) == (None, None)


def test_epoch_medians_and_empty_probe():
    assert epoch_medians([0.1, 5.0, 0.1, 0.2, 0.2], [0, 0, 0, 1, 1]) == {0: (3, 0.1), 1: (2, 0.2)}
    speed = StepThroughput()
    assert loop_fidelity(speed, None) == {}
    with pytest.raises(ValueError, match="steps"):
        BenchProbe(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), steps=0)


class _Data(Dataset):
    def __init__(self, delay: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
        self.delay = delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return self.x[i], self.y[i]


def _net() -> nn.Module:
    # dropout and a shuffled loader: any random number the probe drew would change the training
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _mlp() -> nn.Module:  # no pooling: its CUDA backward is not deterministic
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))


def _fit(probe_steps: int, *, delay: float = 0.0, frozen: bool = False, skip: int = 2, device=None, net=_net):
    pl.seed_everything(0, verbose=False)
    model = net()
    if frozen:
        model[0].weight.requires_grad_(False)
    module = Classifier(model, num_classes=3, optim={"name": "sgd", "lr": 0.1, "scheduler": "none"})
    speed = StepThroughput(skip=skip)
    callbacks: list[pl.Callback] = [speed]
    probe = None
    if probe_steps:
        x, y = _Data().x[:8], _Data().y[:8]
        probe = BenchProbe(x, y, steps=probe_steps, warmup=1, loop=speed, device=device)
        callbacks.append(probe)
    trainer = pl.Trainer(max_epochs=2, accelerator=device.accelerator if device else "cpu", devices=1,
                         deterministic="warn" if device is not None else None, logger=False,
                         enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         limit_val_batches=0)
    trainer.fit(module, DataLoader(_Data(delay), batch_size=8, shuffle=True))
    return model, speed, probe


def test_probe_times_every_epoch_and_leaves_training_bit_identical(monkeypatch):
    import lrd_exp.timing.loop as F

    seen = []
    real = F.prepare_train_step

    def spy(model, *a, **k):
        seen.append(model[0].weight.requires_grad)
        return real(model, *a, **k)

    monkeypatch.setattr(F, "prepare_train_step", spy)
    plain, _, _ = _fit(0)
    probed, speed, probe = _fit(4, frozen=False)
    # bracketed: after each epoch's first step and at its end, their mean for the epoch
    assert probe.bracket and sorted(probe.start_step_s) == sorted(probe.end_step_s) == [0, 1]
    for e in (0, 1):
        assert probe.epoch_step_s[e] == pytest.approx((probe.start_step_s[e] + probe.end_step_s[e]) / 2)
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed when the probe ran"
    fields = loop_fidelity(speed, probe)
    table = fidelity_epochs(speed, probe)
    assert [r["epoch"] for r in table] == [0, 1]
    # the row's numbers are the epochs' numbers weighted by the loop's steps (recomputed here from the table)
    n = sum(r["loop_steps"] for r in table)
    probe_step = sum(r["loop_steps"] * r["probe_step_s"] for r in table) / n
    loop_step = sum(r["loop_steps"] * r["loop_step_s"] for r in table) / n
    assert fields["train_ips_probe"] == pytest.approx(8 / probe_step)
    assert fields["train_ips_fidelity_paired"] == pytest.approx(probe_step / loop_step)
    for r in table:
        assert r["loop_over_probe"] == pytest.approx(r["probe_step_s"] / r["loop_step_s"])
    # the probe times the model as it is: a frozen parameter is timed frozen
    assert seen == [True] * 4
    _fit(4, frozen=True)
    assert seen[4:] == [False] * 4
    # a loop that times its second step cannot host the first half: everything at the epoch's end
    _, _, late = _fit(4, skip=1)
    assert not late.bracket and late.start_step_s == {} and sorted(late.end_step_s) == [0, 1]


def test_the_bracket_stays_out_of_the_loops_timed_steps(monkeypatch):
    """A probe that takes 0.3 s must not show in any step the loop times (all of them take milliseconds)."""
    monkeypatch.setattr(BenchProbe, "_time", lambda self, module, steps: time.sleep(0.3) or 0.01)
    _, speed, probe = _fit(4)
    assert sorted(probe.start_step_s) == [0, 1] and speed.step_times
    assert max(speed.step_times) < 0.3


def test_probe_skips_epochs_the_loop_did_not_measure():
    speed = StepThroughput()
    probe = BenchProbe(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), steps=1, warmup=0, loop=speed)

    class _T:
        current_epoch, world_size, sanity_checking = 0, 1, False

    probe.on_train_epoch_end(_T(), Classifier(_net(), num_classes=3))
    assert probe.epoch_step_s == {}
    speed.epochs = [0]
    probe.on_train_epoch_end(_T(), Classifier(_net(), num_classes=3))
    assert list(probe.epoch_step_s) == [0]
    _T.world_size = 2  # DDP: each rank would time alone
    _T.current_epoch = 1
    speed.epochs = [0, 1]
    probe.on_train_epoch_end(_T(), Classifier(_net(), num_classes=3))
    assert list(probe.epoch_step_s) == [0]


def test_paired_fidelity_exposes_a_slow_data_loader():
    """A loader that sleeps 10 ms per sample (80 ms per batch) against a step of a few ms: far below 1."""
    _, speed, probe = _fit(4, delay=0.01)
    ratio = loop_fidelity(speed, probe)["train_ips_fidelity_paired"]
    assert ratio < 0.5


def test_a_failing_probe_is_reported_and_the_run_goes_on(monkeypatch, caplog):
    """Out of memory while timing the copy: one warning, no paired fields, the training itself completes."""
    import lrd_exp.timing.loop as F

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(F, "prepare_train_step", boom)
    plain, _, _ = _fit(0)
    with caplog.at_level("WARNING", logger="lrd_exp"):
        model, speed, probe = _fit(4)
    assert probe.failed and probe.epoch_step_s == {} and loop_fidelity(speed, probe) == {}
    assert sum("fidelity probe disabled" in r.getMessage() for r in caplog.records) == 1
    for a, b in zip(plain.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_on_cuda_forks_the_gpu_random_state():
    """On a GPU, dropout draws from the CUDA generator: the probe must not consume it."""
    from lrd_exp.devices import resolve_device

    cuda = resolve_device("cuda")
    plain, _, _ = _fit(0, device=cuda, net=_mlp)
    probed, speed, probe = _fit(4, device=cuda, net=_mlp)
    assert sorted(probe.epoch_step_s) == [0, 1] and not probe.failed
    for (name, a), b in zip(plain.state_dict().items(), probed.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu()), f"{name} changed when the probe ran"
    assert loop_fidelity(speed, probe)["train_ips_fidelity_paired"] > 0


def test_step_throughput_uses_per_epoch_medians():
    from types import SimpleNamespace

    from lrd_exp.timing.loop import StepThroughput

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

    import lrd_exp.timing.loop as M

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
    from lrd_exp.timing.loop import StepThroughput

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
