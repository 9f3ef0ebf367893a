"""What the fine-tuning loop itself achieved (:class:`StepThroughput`) and how it compares with the benchmark.

The benchmark times a bare training step; the loop adds data loading, hooks and logging.

``train_ips_fidelity`` divides the loop's images/s by a benchmark run after training, seconds to minutes later;
on a shared machine whose speed drifts, that ratio carries the drift. The probe (opt-in, ``bench.probe_steps``)
times the benchmark's own training step at both ends of every fine-tuning epoch, on a copy of the model in that
epoch's freeze state, at the loop's batch, precision and layout, so each epoch of the loop has a benchmark
measured around it and the ratio keeps only what the framework adds (loading, hooks, logging).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch

from lrd_exp.devices.resolve import DeviceInfo, synchronize
from lrd_exp.timing.steps import OptimizerFactory, prepare_train_step

log = logging.getLogger("lrd_exp")


class StepThroughput(pl.Callback):
    """Images/s of the real training loop (data loading, logging and callbacks included).

    Wall time between consecutive batch ends, device-synchronised, skipping the first ``skip`` steps of every
    epoch (warm-up, loader start). The summary uses the benchmark's statistic (median step time per epoch,
    i.e. per freeze state, averaged by the steps each epoch lasted), so ``train_ips_fidelity`` compares like with
    like and shows whether the framework itself (data loader, logging, callbacks) hides a bottleneck.

    That ratio compares two moments of a drifting machine, so the callback also splits every counted step at
    ``on_train_batch_start``: the part before it (fetching and moving the batch, the previous step's hooks,
    logging, progress bar) over the whole step is ``overhead_share``, measured on the same steps and immune to
    drift. Near 0 the loop runs at the model's speed; a slow data loader shows as a large share. Callbacks that
    run before this one at batch start (the freezing callback's snapshot) count as between steps; under DDP this
    is the reporting rank's share (another rank's stall shows inside its step, in the gradient all-reduce).
    """

    def __init__(self, device: DeviceInfo | None = None, skip: int = 2) -> None:
        super().__init__()
        self.device = device
        self.skip = skip
        self.step_times: list[float] = []
        self.batch_sizes: list[int] = []
        self.epochs: list[int] = []
        self.wait_times: list[float] = []  # per counted step: previous batch end -> this batch's start
        self._last: float | None = None
        self._start: float | None = None
        self._seen = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last, self._start, self._seen = None, None, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()  # the previous end was synchronised: nothing of it is still queued

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.device is not None:
            synchronize(trainer.strategy.root_device)  # this rank's device (a DDP worker is not on cuda:0)
        now = time.perf_counter()
        if self._last is not None and self._seen >= self.skip:
            self.step_times.append(now - self._last)
            self.batch_sizes.append(int(batch[0].shape[0]))
            self.epochs.append(int(trainer.current_epoch))
            start = self._start if self._start is not None and self._last <= self._start <= now else self._last
            self.wait_times.append(start - self._last)
            pl_module.log("train/images_per_s", self.batch_sizes[-1] / self.step_times[-1], on_step=True,
                          on_epoch=False, batch_size=self.batch_sizes[-1])
        self._last = now
        self._seen += 1

    @property
    def overhead_share(self) -> float | None:
        """Share of the loop's wall time outside the training step itself (loading, hooks, logging)."""
        total = sum(self.step_times)
        return sum(self.wait_times) / total if self.step_times and total > 0 else None

    @property
    def images_per_s(self) -> float | None:
        """Median-based throughput: each epoch's median step time, averaged by the epochs' step counts."""
        if not self.step_times:
            return None
        per_epoch = epoch_medians(self.step_times, self.epochs)
        mean_step = sum(n * median for n, median in per_epoch.values()) / len(self.step_times)
        return statistics.median(self.batch_sizes) / mean_step if mean_step > 0 else None


class BenchProbe(pl.Callback):
    """Times the benchmark's training step on a copy of the model around every training epoch.

    With ``loop`` (the run's :class:`StepThroughput`) that skips at least two steps per epoch,
    half of ``steps`` run right after the epoch's first step (inside the loop's untimed warm-up, in the epoch's
    freeze state) and half at its end; their mean brackets the epoch, so a drift that is linear over it cancels.
    Otherwise all of them run at the end. (With ``freeze.unit=step`` the state can change inside an epoch; the
    probe times the states at its two ends.) Only the epochs the loop measured are probed (a smoke run's are too
    short). The copy gets its own optimizer, so the run's weights, optimizer state and BatchNorm statistics are
    untouched, and the random state is forked, so a run trains identically with or without the probe. Skipped
    under DDP (each rank would time alone, and a SyncBatchNorm copy would wait for the others).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, steps: int = 8, warmup: int = 3,
                 precision: str = "32-true", channels_last: bool = False, device: DeviceInfo | None = None,
                 optimizer_factory: OptimizerFactory | None = None, loop: Any = None) -> None:
        super().__init__()
        if steps < 1 or warmup < 0:
            raise ValueError(f"probe steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
        self.x, self.y = x, y
        self.steps, self.warmup = steps, warmup
        self.precision, self.channels_last = precision, channels_last
        self.device, self.optimizer_factory = device, optimizer_factory
        self.batch_size = int(x.shape[0])
        self.loop = loop
        self.bracket = loop is not None and getattr(loop, "skip", 0) >= 2 and steps >= 2
        self.start_step_s: dict[int, float] = {}  # epoch -> median right after its first step (bracket only)
        self.end_step_s: dict[int, float] = {}  # epoch -> median at its end
        self.failed = False

    @property
    def epoch_step_s(self) -> dict[int, float]:
        """Epoch -> the probe's step time for it: the mean of both ends when bracketed, else the end."""
        return {e: (self.start_step_s[e] + end) / 2 if e in self.start_step_s else end
                for e, end in self.end_step_s.items()}

    def _rng_devices(self, pl_module: pl.LightningModule) -> tuple[list[int], str | None]:
        """The accelerator whose random state the copy's dropout would draw from (forked with the CPU's)."""
        dev = self.device.torch_device if self.device is not None else pl_module.device
        if dev.type in ("cuda", "npu"):
            return [dev.index if dev.index is not None else 0], dev.type
        return [], None

    def _time(self, pl_module: pl.LightningModule, steps: int) -> float | None:
        """Median step time of a fresh copy; None (and no more probing) when it fails, e.g. out of memory: a
        diagnostic must not end a long run."""
        model = getattr(pl_module, "model", pl_module)
        devices, device_type = self._rng_devices(pl_module)
        try:
            with torch.random.fork_rng(devices=devices, device_type=device_type or "cuda"):
                step = prepare_train_step(model, self.x, self.y, optimizer_factory=self.optimizer_factory,
                                          precision=self.precision, channels_last=self.channels_last,
                                          device=self.device)
                return step.time(warmup=self.warmup, steps=steps).median_s
        except Exception as exc:  # reported, then the run goes on without the probe
            log.warning("fidelity probe disabled: timing a copy of the model failed (%s: %s); "
                        "train_ips_fidelity_paired stays empty (bench.probe_steps=0 turns it off)",
                        type(exc).__name__, exc)
            self.failed = True
            return None

    def _off(self, trainer: pl.Trainer) -> bool:
        return self.failed or trainer.world_size > 1 or trainer.sanity_checking

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.bracket or batch_idx != 0 or self._off(trainer):
            return
        n = trainer.num_training_batches
        if isinstance(n, (int, float)) and n <= self.loop.skip:  # the loop will not time a step of this epoch
            return
        start = self._time(pl_module, self.steps // 2)
        if start is not None:
            self.start_step_s[int(trainer.current_epoch)] = start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        if self._off(trainer) or (self.loop is not None and epoch not in self.loop.epochs):
            return
        start = self.start_step_s.get(epoch)
        end = self._time(pl_module, self.steps - self.steps // 2 if start is not None else self.steps)
        if end is None:
            return
        self.end_step_s[epoch] = end


def epoch_medians(step_times: list[float], epochs: list[int]) -> dict[int, tuple[int, float]]:
    """Per epoch of a loop: (number of steps, median step time)."""
    per_epoch: dict[int, list[float]] = {}
    for epoch, dt in zip(epochs, step_times):
        per_epoch.setdefault(epoch, []).append(dt)
    return {e: (len(ts), statistics.median(ts)) for e, ts in per_epoch.items()}


def paired_fidelity(loop: dict[int, tuple[int, float]], loop_batch: float, probe: dict[int, float],
                    probe_batch: int) -> tuple[float | None, float | None]:
    """(benchmark images/s, loop / benchmark) over the epochs both measured, weighted like the loop's images/s.

    Each epoch's median step counts as many times as the loop ran steps in it, for both sides, so a schedule's
    slow early stages weigh the same in the loop and in its probe.
    """
    common = [e for e in loop if e in probe]
    if not common or loop_batch <= 0:
        return None, None
    n = sum(loop[e][0] for e in common)
    loop_step = sum(loop[e][0] * loop[e][1] for e in common) / n
    probe_step = sum(loop[e][0] * probe[e] for e in common) / n
    if loop_step <= 0 or probe_step <= 0:
        return None, None
    probe_ips = probe_batch / probe_step
    return probe_ips, (loop_batch / loop_step) / probe_ips


def fidelity_epochs(speed: Any, probe: BenchProbe | None) -> list[dict[str, Any]]:
    """Per epoch: the loop's steps and median step time beside the probe's (``fidelity.csv`` of a run)."""
    if probe is None or not speed.step_times:
        return []
    loop = epoch_medians(speed.step_times, speed.epochs)
    probe_step_s = probe.epoch_step_s  # a property: derived once here, not per epoch
    return [{"epoch": e, "loop_steps": n, "loop_step_s": med, "probe_start_step_s": probe.start_step_s.get(e),
             "probe_end_step_s": probe.end_step_s.get(e), "probe_step_s": probe_step_s.get(e),
             "loop_over_probe": probe_step_s[e] / med if e in probe_step_s and med > 0 else None}
            for e, (n, med) in sorted(loop.items())]


def loop_fidelity(speed: Any, probe: BenchProbe | None) -> dict[str, Any]:
    """Result-row fields of the paired measurement (empty when the probe did not run)."""
    if probe is None or not probe.epoch_step_s or not speed.step_times:
        return {}
    loop = epoch_medians(speed.step_times, speed.epochs)
    probe_ips, ratio = paired_fidelity(loop, statistics.median(speed.batch_sizes), probe.epoch_step_s,
                                       probe.batch_size)
    if ratio is None:
        return {}
    return {"train_ips_probe": probe_ips, "train_ips_fidelity_paired": ratio}
