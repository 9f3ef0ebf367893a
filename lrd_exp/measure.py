"""Side-by-side measurement of the original and the decomposed model (with its freeze schedule).

Both run in the same process on the same input, interleaved over several rounds, so the ratios stay valid on
a noisy machine. A freeze schedule is measured state by state and averaged by the time each state lasts.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from lrd_exp.bench import (
    OptimizerFactory,
    Timing,
    count_flops,
    count_params,
    prepare_inference,
    prepare_train_step,
)
from lrd_exp.devices import DeviceInfo, synchronize
from lrd_exp.fidelity import epoch_medians
from lrd_exp.freezing import Factor, FreezeSchedule, collect_factors, measure_factor_costs, set_frozen


@dataclass
class FreezeState:
    """One state of a freeze schedule and the share of training it lasts."""

    weight: float
    frozen: list[str]
    label: str = ""


@dataclass
class Measured:
    train: Timing
    infer: Timing | None
    train_flops: int
    stages: list[dict[str, Any]] = field(default_factory=list)
    round_spread: float | None = None  # the original's drift during the benchmark (see round_spread)


def round_spread(rounds: list[Timing], block: int = 4, max_blocks: int = 12) -> float | None:
    """How much one fixed training step moved during the benchmark: the machine's drift, seen from inside it.

    The original's timed steps, in time order, are cut into consecutive blocks of at least ``block`` steps (at
    most ``max_blocks``); the result is (max - min) / median of the block medians, so it does not depend on how
    finely the rounds interleave. None with fewer than two blocks.
    """
    times = [t for r in rounds for t in r.times_s]
    n = min(max_blocks, len(times) // max(block, 1))
    if n < 2:
        return None
    edges = [round(i * len(times) / n) for i in range(n + 1)]
    medians = [statistics.median(times[a:b]) for a, b in zip(edges, edges[1:])]
    return (max(medians) - min(medians)) / statistics.median(medians)


def schedule_states(model: nn.Module, freeze_cfg: Any, total_units: int,
                    history: list[dict[str, Any]] | None = None,
                    example_input: torch.Tensor | None = None) -> list[FreezeState]:
    """The states a schedule goes through over ``total_units``, from a run's history when there is one.

    ``example_input`` (one sample) gives ``importance=cost`` the factors' real weight-gradient FLOPs.
    """
    factors = collect_factors(model)
    schedule = FreezeSchedule(freeze_cfg, factors)
    if schedule.importance == "cost" and example_input is not None and not history:
        schedule.costs = measure_factor_costs(model, example_input)
    total_units = max(int(total_units), 1)
    if history:
        starts = [h["t"] for h in history] + [total_units]
        states = []
        for h, end in zip(history, starts[1:]):
            states.append(FreezeState(max(end - h["t"], 0), list(h["frozen"]), f"{schedule.unit}>={h['t']}"))
        states = [s for s in states if s.weight > 0] or states[-1:]
    else:
        states = [FreezeState(length, [f.key for f in frozen], f"{schedule.unit}>={start}")
                  for start, length, frozen in schedule.timeline(total_units)]
    merged: dict[tuple[str, ...], FreezeState] = {}  # alternating phases repeat: measure each set once
    for s in states:
        key = tuple(sorted(s.frozen))
        if key in merged:
            merged[key].weight += s.weight
        else:
            merged[key] = s
    states = list(merged.values())
    total = sum(s.weight for s in states) or 1
    for s in states:
        s.weight = s.weight / total
    return states


def _merge(timings: list[Timing]) -> Timing:
    times = [t for timing in timings for t in timing.times_s]
    return Timing(median_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=times,
                  batch_size=timings[0].batch_size)


def _weighted(timings: list[Timing], weights: list[float]) -> Timing:
    """A schedule's time-weighted step time: weighted mean of the states' medians (and of their extremes)."""
    med = sum(w * t.median_s for t, w in zip(timings, weights))
    lo = sum(w * t.min_s for t, w in zip(timings, weights))
    hi = sum(w * t.max_s for t, w in zip(timings, weights))
    return Timing(median_s=med, min_s=lo, max_s=hi, times_s=[med], batch_size=timings[0].batch_size)


def compare(original: nn.Module, decomposed: nn.Module, states: list[FreezeState], x: torch.Tensor,
            y: torch.Tensor, *, warmup: int = 3, steps: int = 10, rounds: int | None = None,
            precision: str = "32-true", channels_last: bool = False, compile: bool = False,
            device: DeviceInfo | None = None, inference: bool = True, min_time_s: float = 0.0, switch_warmup: int = 0,
            optimizer_factory: OptimizerFactory | None = None, desc: str = "timing") -> tuple[Measured, Measured]:
    """Measure both models' training step (every freeze state of the decomposed one) and inference.

    Each model / freeze state gets its own prepared copy once; the rounds then time them in turn (``warmup``
    untimed steps in the first round, ``switch_warmup`` in later ones, after the switch from another model),
    so drift of a shared machine hits all of them alike. ``optimizer_factory`` builds the training step's optimizer
    (default: SGD with momentum); pass the training loop's so the benchmark times the same update.
    ``steps`` (and ``min_time_s``) are totals per model / state, split over the rounds; ``rounds=None`` gives
    every timed step its own round. That finest interleaving is the default because a shared machine's speed moves
    within seconds (on a 2-core CPU, six default benchmarks together spanned 1.15-1.39x in 12 rounds of 4 steps
    and 1.21-1.39x in 48 rounds of 1, which also take a fifth less time; results/benchmark_cpu/repeatability_study.md).
    """
    if rounds is not None and rounds < 1:
        raise ValueError(f"rounds must be None (one per step) or >= 1, got {rounds}")
    factors: list[Factor] = collect_factors(decomposed)
    by_key = {f.key: f for f in factors}
    kw = dict(precision=precision, channels_last=channels_last, compile=compile, device=device)
    train_kw = dict(kw, optimizer_factory=optimizer_factory)
    rounds = min(rounds or steps, max(steps, 1))  # at least one timed step per round
    # `steps` stays the total: the remainder goes to the first rounds (48 over 10 rounds: 5 x 8 rounds, 4 x 2)
    round_steps = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    min_round_s = min_time_s / rounds
    saved = {id(p): p.requires_grad for p in decomposed.parameters()}
    try:
        orig_step = prepare_train_step(original, x, y, **train_kw)
        dec_steps = []
        for state in states:
            set_frozen(factors, [by_key[k] for k in state.frozen if k in by_key])
            dec_steps.append(prepare_train_step(decomposed, x, y, **train_kw))
        for p in decomposed.parameters():
            p.requires_grad_(saved[id(p)])
        infer_steps = [prepare_inference(original, x, **kw), prepare_inference(decomposed, x, **kw)] if inference else []
        orig_train: list[Timing] = []
        dec_train: list[list[Timing]] = [[] for _ in states]
        orig_infer: list[Timing] = []
        dec_infer: list[Timing] = []
        # a progress bar on a terminal only (stderr, cleared at the end), updated between timed steps
        for r in tqdm(range(rounds), desc=desc, unit="round", disable=None, leave=False, mininterval=0.5):
            w = warmup if r == 0 else switch_warmup
            per_round = dict(steps=max(1, round_steps[r]), min_time_s=min_round_s)
            orig_train.append(orig_step.time(warmup=w, **per_round))
            for i, step in enumerate(dec_steps):
                dec_train[i].append(step.time(warmup=w, **per_round))
            if inference:
                orig_infer.append(infer_steps[0].time(warmup=w, **per_round))
                dec_infer.append(infer_steps[1].time(warmup=w, **per_round))
        del orig_step, dec_steps, infer_steps
        stage_flops = []
        for state in states:
            set_frozen(factors, [by_key[k] for k in state.frozen if k in by_key])
            stage_flops.append(count_flops(decomposed, x, y=y, train=True))
    finally:
        for p in decomposed.parameters():
            p.requires_grad_(saved[id(p)])
    weights = [s.weight for s in states]
    merged = [_merge(t) for t in dec_train]
    stages = [{"label": s.label, "weight": s.weight, "n_frozen": len(s.frozen),
               "train_ips": m.ips, "train_ips_min": m.ips_min, "train_ips_max": m.ips_max, "train_flops": f}
              for s, m, f in zip(states, merged, stage_flops)]
    spread = round_spread(orig_train)  # judged where the run reports (results.unstable_note)
    orig = Measured(_merge(orig_train), _merge(orig_infer) if inference else None,
                    count_flops(original, x, y=y, train=True), round_spread=spread)
    dec = Measured(_weighted(merged, weights), _merge(dec_infer) if inference else None,
                   round(sum(w * f for w, f in zip(weights, stage_flops))), stages)
    return orig, dec


def comparison_fields(original: nn.Module, decomposed: nn.Module, orig: Measured, dec: Measured,
                      x: torch.Tensor) -> dict[str, Any]:
    """Result-row fields (size and speed) of a comparison."""
    one = x[:1]
    row: dict[str, Any] = {
        "params_original": count_params(original), "params_decomposed": count_params(decomposed),
        "flops_original": count_flops(original, one, train=False),
        "flops_decomposed": count_flops(decomposed, one, train=False),
        "train_flops_original": orig.train_flops, "train_flops_decomposed": dec.train_flops,
        "freeze_stages": dec.stages, "bench_round_spread": orig.round_spread,
    }
    for kind, a, b in (("train", orig.train, dec.train), ("infer", orig.infer, dec.infer)):
        if a is None or b is None:
            continue
        row[f"{kind}_ips_original"], row[f"{kind}_ips_decomposed"] = a.ips, b.ips
        row[f"{kind}_ips_original_min"], row[f"{kind}_ips_original_max"] = a.ips_min, a.ips_max
        row[f"{kind}_ips_decomposed_min"], row[f"{kind}_ips_decomposed_max"] = b.ips_min, b.ips_max
    return row


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
