"""The original and the decomposed model timed side by side: each prepared once, then timed in turn over several
rounds, in the same process on the same input, so drift of a shared machine hits all of them alike and the ratios
stay valid on a noisy machine. The decomposed model is timed in every training state it goes through (a freeze
schedule's), each averaged by the time it lasts.

The states are opaque here: the caller says how to put the decomposed model into one (``set_state``), so timing
needs nothing of the freezing package.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.timing.flops import count_flops
from lrd_exp.timing.memory import training_memory
from lrd_exp.timing.steps import OptimizerFactory, PreparedStep, Timing, prepare_inference, prepare_train_step


@dataclass(frozen=True)
class CompareSettings:
    """How a comparison times.

    ``steps`` (and ``min_time_s``) are totals per model / state, split over the rounds; ``rounds=None`` gives every
    timed step its own round. That finest interleaving is the default because a shared machine's speed moves within
    seconds (results/benchmark_cpu/repeatability_study.md compares the two).
    """

    warmup: int = 3  # untimed steps before the first round
    steps: int = 10
    rounds: int | None = None
    switch_warmup: int = 0  # untimed steps before each later round (after the switch from another model)
    min_time_s: float = 0.0
    # how each step runs
    precision: str = "32-true"
    channels_last: bool = False
    compile: bool = False
    device: DeviceInfo | None = None
    optimizer_factory: OptimizerFactory | None = None  # the training loop's, so the same update is timed (None: SGD)
    # what is measured besides the training step
    inference: bool = True
    latency: bool = False  # the inference of one image of each model
    memory: bool = False  # one training step's memory (lrd_exp.timing.memory.training_memory)
    flops: bool = True  # each state's training FLOPs (None when False)
    desc: str = "timing"  # the progress bar's label

    def round_steps(self) -> list[int]:
        """Timed steps per round: ``steps`` stays the total, the remainder goes to the first rounds (48 over 10
        rounds: 5 x 8 rounds, 4 x 2), at least one per round."""
        if self.rounds is not None and self.rounds < 1:
            raise ValueError(f"rounds must be None (one per step) or >= 1, got {self.rounds}")
        rounds = min(self.rounds or self.steps, max(self.steps, 1))
        return [max(1, self.steps // rounds + (r < self.steps % rounds)) for r in range(rounds)]


class TrainState(Protocol):
    """One training state of the decomposed model (a freeze state): its name and the share of training it lasts."""

    label: str
    weight: float
    frozen: Sequence[str]


@dataclass
class Measured:
    """One model's numbers from a comparison (None where not measured)."""

    train: Timing | None = None
    infer: Timing | None = None
    latency: Timing | None = None  # inference of one image
    train_flops: int | None = None
    memory_mb: float | None = None  # one training step (the largest state's for the decomposed model)
    memory_kind: str | None = None  # "allocator peak" | "counted"
    stages: list[dict[str, Any]] = field(default_factory=list)  # the decomposed model's states, one dict each
    round_spread: float | None = None  # the original's drift during the benchmark (see round_spread)


@dataclass
class Comparison:
    """The comparison's result by model: the original, the decomposed one (time-weighted over its states) and its
    deployed form (inference only; empty without one)."""

    original: Measured
    decomposed: Measured
    deployed: Measured = field(default_factory=Measured)


@dataclass
class _Rounds:
    """Every prepared step's timings, one per round, by what was timed."""

    original: list[Timing]
    states: list[list[Timing]]
    infer: list[list[Timing]]  # original, decomposed (, deployed)
    latency: list[list[Timing]]


@dataclass
class _Counted:
    """What is counted rather than timed, per state: training FLOPs and memory."""

    original_memory: tuple[float | None, str | None]
    flops: list[int | None]
    memory: list[float | None]


def compare(original: nn.Module, decomposed: nn.Module, states: Sequence[TrainState], x: torch.Tensor,
            y: torch.Tensor, settings: CompareSettings | None = None, *,
            set_state: Callable[[Any], None], deployed: nn.Module | None = None) -> Comparison:
    """Time both models' training step (every state of the decomposed one) and inference, side by side.

    ``set_state(state)`` puts ``decomposed`` into a state (which parameters train); the caller's ``requires_grad``
    flags are restored afterwards. ``deployed`` (the decomposed model with each layer in its faster form) is timed
    for inference beside them. Each model / state gets its own prepared copy once; the rounds then time them in turn.
    ``settings``: :class:`CompareSettings` (its defaults when None).
    """
    settings = settings or CompareSettings()
    saved = _trainable(decomposed)
    try:
        timed = _time_rounds(original, decomposed, states, x, y, settings, set_state, deployed, saved)
        counted = _count_states(original, decomposed, states, x, y, settings, set_state)
    finally:
        _restore(decomposed, saved)
    return _comparison(original, states, timed, counted, x, y, settings)


def _trainable(model: nn.Module) -> dict[int, bool]:
    return {id(p): p.requires_grad for p in model.parameters()}


def _restore(model: nn.Module, saved: dict[int, bool]) -> None:
    for p in model.parameters():
        p.requires_grad_(saved[id(p)])


def _time_rounds(original: nn.Module, decomposed: nn.Module, states: Sequence[TrainState], x: torch.Tensor,
                 y: torch.Tensor, s: CompareSettings, set_state: Callable[[Any], None], deployed: nn.Module | None,
                 saved: dict[int, bool]) -> _Rounds:
    """Prepare every step, then time them in turn; the prepared copies are freed on return (before memory is
    measured)."""
    s.round_steps()  # a bad ``rounds`` fails before any work
    kw = dict(precision=s.precision, channels_last=s.channels_last, compile=s.compile, device=s.device)
    train_kw = dict(kw, optimizer_factory=s.optimizer_factory)
    train = [prepare_train_step(original, x, y, **train_kw)]
    for state in states:
        set_state(state)
        train.append(prepare_train_step(decomposed, x, y, **train_kw))
    _restore(decomposed, saved)
    inferred = [original, decomposed] + ([deployed] if deployed is not None else [])
    infer = [prepare_inference(m, x, **kw) for m in inferred] if s.inference else []
    latency = [prepare_inference(m, x[:1], **kw) for m in inferred] if s.latency else []
    timings = interleave([*train, *infer, *latency], s)
    n, m = len(train), len(train) + len(infer)
    return _Rounds(timings[0], timings[1:n], timings[n:m], timings[m:])


def interleave(steps: list[PreparedStep], s: CompareSettings) -> list[list[Timing]]:
    """Each prepared step timed once per round, in turn; per step, its timings in round order."""
    round_steps = s.round_steps()
    min_round_s = s.min_time_s / len(round_steps)
    out: list[list[Timing]] = [[] for _ in steps]
    # a progress bar on a terminal only (stderr, cleared at the end), updated between timed steps
    for r in tqdm(range(len(round_steps)), desc=s.desc, unit="round", disable=None, leave=False, mininterval=0.5):
        warmup = s.warmup if r == 0 else s.switch_warmup
        for timings, step in zip(out, steps):
            timings.append(step.time(warmup=warmup, steps=round_steps[r], min_time_s=min_round_s))
    return out


def _count_states(original: nn.Module, decomposed: nn.Module, states: Sequence[TrainState], x: torch.Tensor,
                  y: torch.Tensor, s: CompareSettings, set_state: Callable[[Any], None]) -> _Counted:
    """The original's training memory, and each state's training FLOPs and memory (when asked)."""
    mem_kw = dict(optimizer_factory=s.optimizer_factory, precision=s.precision, channels_last=s.channels_last,
                  device=s.device)
    counted = _Counted(training_memory(original, x, y, **mem_kw) if s.memory else (None, None), [], [])
    for state in states:
        set_state(state)
        counted.flops.append(count_flops(decomposed, x, y=y, train=True) if s.flops else None)
        counted.memory.append(training_memory(decomposed, x, y, **mem_kw)[0] if s.memory else None)
    return counted


def _comparison(original: nn.Module, states: Sequence[TrainState], timed: _Rounds, counted: _Counted,
                x: torch.Tensor, y: torch.Tensor, s: CompareSettings) -> Comparison:
    """The rounds pooled per model, the states weighted by the time each lasts."""
    weights = [state.weight for state in states]
    merged = [_merge(t) for t in timed.states]
    stages = [{"label": state.label, "weight": state.weight, "n_frozen": len(state.frozen),
               "train_ips": m.ips, "train_ips_min": m.ips_min, "train_ips_max": m.ips_max, "train_flops": f,
               "train_mem_mb": mb}
              for state, m, f, mb in zip(states, merged, counted.flops, counted.memory)]
    infer = [_merge(t) for t in timed.infer] + [None] * (3 - len(timed.infer))
    latency = [_merge(t) for t in timed.latency] + [None] * (3 - len(timed.latency))
    memory_mb, memory_kind = counted.original_memory
    orig = Measured(_merge(timed.original), infer[0], latency[0],
                    train_flops=count_flops(original, x, y=y, train=True) if s.flops else None,
                    memory_mb=memory_mb, memory_kind=memory_kind,
                    round_spread=round_spread(timed.original))  # judged where the run reports (results.unstable_note)
    dec = Measured(_weighted(merged, weights), infer[1], latency[1],
                   train_flops=round(sum(w * f for w, f in zip(weights, counted.flops))) if s.flops else None,
                   memory_mb=max(counted.memory) if s.memory and counted.memory else None, memory_kind=memory_kind,
                   stages=stages)
    return Comparison(orig, dec, Measured(infer=infer[2], latency=latency[2]))


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


def _merge(timings: list[Timing]) -> Timing:
    """Several rounds' timings of one step as one: every timed step pooled."""
    times = [t for timing in timings for t in timing.times_s]
    return Timing(median_s=statistics.median(times), min_s=min(times), max_s=max(times), times_s=times,
                  batch_size=timings[0].batch_size)


def _weighted(timings: list[Timing], weights: list[float]) -> Timing:
    """A schedule's time-weighted step time: weighted mean of the states' medians (and of their extremes)."""
    med = sum(w * t.median_s for t, w in zip(timings, weights))
    lo = sum(w * t.min_s for t, w in zip(timings, weights))
    hi = sum(w * t.max_s for t, w in zip(timings, weights))
    return Timing(median_s=med, min_s=lo, max_s=hi, times_s=[med], batch_size=timings[0].batch_size)
