"""The measure stage: the original and the decomposed model (with its freeze schedule), side by side.

Both run in the same process on the same input, interleaved over several rounds, so the ratios stay valid on
a noisy machine. A freeze schedule is measured state by state and averaged by the time each state lasts.
"""

from __future__ import annotations

import copy
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from lrd_exp.config.schema import enum_value as _v
from lrd_exp.deploy.merge import merge_for_inference
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.freezing.factors import Factor, collect_factors, frozen_parameters, set_frozen
from lrd_exp.freezing.schedule import FreezeState, schedule_states
from lrd_exp.tasks.common import bench_channels_last, bench_optimizer, bench_precision, freeze_total_units
from lrd_exp.timing.flops import count_flops, count_params
from lrd_exp.timing.memory import training_memory
from lrd_exp.timing.steps import OptimizerFactory, Timing, prepare_inference, prepare_train_step

log = logging.getLogger("lrd_exp")


@dataclass
class Measured:
    train: Timing
    infer: Timing | None
    train_flops: int | None
    stages: list[dict[str, Any]] = field(default_factory=list)
    round_spread: float | None = None  # the original's drift during the benchmark (see round_spread)
    latency: Timing | None = None  # inference of one image
    memory_mb: float | None = None  # one training step (the largest freeze state for a schedule)
    memory_kind: str | None = None  # "allocator peak" | "counted"
    deployed_infer: Timing | None = None  # the deployed form (decomposed side only)
    deployed_latency: Timing | None = None


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
            optimizer_factory: OptimizerFactory | None = None, desc: str = "timing",
            deployed: nn.Module | None = None, latency: bool = False, memory: bool = False, flops: bool = True
            ) -> tuple[Measured, Measured]:
    """Measure both models' training step (every freeze state of the decomposed one) and inference.

    ``deployed`` (the decomposed model with each layer in its faster form) is timed for inference beside them;
    ``latency`` adds the inference of one image of each model; ``memory`` the memory of one training step of the
    original and of every freeze state (:func:`lrd_exp.timing.memory.training_memory`); ``flops=False`` skips
    counting each state's training FLOPs (``train_flops`` is then None).

    Each model / freeze state gets its own prepared copy once; the rounds then time them in turn (``warmup``
    untimed steps in the first round, ``switch_warmup`` in later ones, after the switch from another model),
    so drift of a shared machine hits all of them alike. ``optimizer_factory`` builds the training step's optimizer
    (default: SGD with momentum); pass the training loop's so the benchmark times the same update.
    ``steps`` (and ``min_time_s``) are totals per model / state, split over the rounds; ``rounds=None`` gives
    every timed step its own round. That finest interleaving is the default because a shared machine's speed moves
    within seconds (results/benchmark_cpu/repeatability_study.md compares the two).
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
    user_frozen = frozen_parameters(factors)  # what was frozen before the benchmark stays frozen in every state

    def apply(state: FreezeState) -> None:
        set_frozen(factors, [by_key[k] for k in state.frozen if k in by_key], state.freeze_bias,
                   keep_frozen=user_frozen)

    try:
        orig_step = prepare_train_step(original, x, y, **train_kw)
        dec_steps = []
        for state in states:
            apply(state)
            dec_steps.append(prepare_train_step(decomposed, x, y, **train_kw))
        for p in decomposed.parameters():
            p.requires_grad_(saved[id(p)])
        inferred = [original, decomposed] + ([deployed] if deployed is not None else [])
        infer_steps = [prepare_inference(m, x, **kw) for m in inferred] if inference else []
        latency_steps = [prepare_inference(m, x[:1], **kw) for m in inferred] if latency else []
        orig_train: list[Timing] = []
        dec_train: list[list[Timing]] = [[] for _ in states]
        infer: list[list[Timing]] = [[] for _ in infer_steps]
        lat: list[list[Timing]] = [[] for _ in latency_steps]
        # a progress bar on a terminal only (stderr, cleared at the end), updated between timed steps
        for r in tqdm(range(rounds), desc=desc, unit="round", disable=None, leave=False, mininterval=0.5):
            w = warmup if r == 0 else switch_warmup
            per_round = dict(steps=max(1, round_steps[r]), min_time_s=min_round_s)
            orig_train.append(orig_step.time(warmup=w, **per_round))
            for i, step in enumerate(dec_steps):
                dec_train[i].append(step.time(warmup=w, **per_round))
            for timings, step in zip(infer + lat, infer_steps + latency_steps):
                timings.append(step.time(warmup=w, **per_round))
        del orig_step, dec_steps, infer_steps, latency_steps
        mem_kw = dict(optimizer_factory=optimizer_factory, precision=precision, channels_last=channels_last,
                      device=device)
        orig_mem = training_memory(original, x, y, **mem_kw) if memory else (None, None)
        stage_flops, stage_mem = [], []
        for state in states:
            apply(state)
            stage_flops.append(count_flops(decomposed, x, y=y, train=True) if flops else None)
            stage_mem.append(training_memory(decomposed, x, y, **mem_kw)[0] if memory else None)
    finally:
        for p in decomposed.parameters():
            p.requires_grad_(saved[id(p)])
    weights = [s.weight for s in states]
    merged = [_merge(t) for t in dec_train]
    stages = [{"label": s.label, "weight": s.weight, "n_frozen": len(s.frozen),
               "train_ips": m.ips, "train_ips_min": m.ips_min, "train_ips_max": m.ips_max, "train_flops": f,
               "train_mem_mb": mb}
              for s, m, f, mb in zip(states, merged, stage_flops, stage_mem)]
    spread = round_spread(orig_train)  # judged where the run reports (results.unstable_note)
    infer_t = [_merge(t) for t in infer] + [None] * (3 - len(infer))
    lat_t = [_merge(t) for t in lat] + [None] * (3 - len(lat))
    orig = Measured(_merge(orig_train), infer_t[0], count_flops(original, x, y=y, train=True) if flops else None,
                    round_spread=spread,
                    latency=lat_t[0], memory_mb=orig_mem[0], memory_kind=orig_mem[1])
    dec = Measured(_weighted(merged, weights), infer_t[1],
                   round(sum(w * f for w, f in zip(weights, stage_flops))) if flops else None,
                   stages, latency=lat_t[1], memory_mb=max(stage_mem) if memory and stage_mem else None,
                   memory_kind=orig_mem[1], deployed_infer=infer_t[2], deployed_latency=lat_t[2])
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
    if dec.deployed_infer is not None:
        row["infer_ips_deployed"] = dec.deployed_infer.ips
    for side, timing in (("original", orig.latency), ("decomposed", dec.latency), ("deployed", dec.deployed_latency)):
        if timing is not None:
            row[f"latency_ms_{side}"] = timing.median_s * 1e3
            row[f"latency_ms_{side}_p90"] = timing.quantile_s(0.9) * 1e3
    if orig.memory_mb is not None:
        row.update(train_mem_mb_original=orig.memory_mb, train_mem_mb_decomposed=dec.memory_mb,
                   train_mem_kind=orig.memory_kind)
    return row


def deploy(decomposed: nn.Module, x: torch.Tensor, *, device: DeviceInfo | None, precision: str,
           channels_last: bool, warmup: int, steps: int) -> tuple[nn.Module, dict[str, Any]]:
    """The deployed form (each layer factored or merged, whichever infers faster here) and its row fields."""
    deployed = copy.deepcopy(decomposed).eval()
    report = merge_for_inference(deployed, x, device=device, precision=precision, channels_last=channels_last,
                                 warmup=warmup, steps=max(steps // 4, 5))
    log.info("%s", report.summary())
    return deployed, {"layers_merged": report.layers_merged, "merge_report": report.layers}


def measure_pair(cfg: DictConfig, device: DeviceInfo, original: nn.Module, decomposed: nn.Module, dm: Any,
                 history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    b = cfg.bench
    batch = b.batch_size or cfg.trainer.batch_size
    x, y = dm.example_batch(batch)
    x, y = x.to(device.torch_device), y.to(device.torch_device)
    original, decomposed = original.to(device.torch_device), decomposed.to(device.torch_device)
    steps_per_epoch = None
    if _v(cfg.freeze.unit) == "step" and not cfg.trainer.max_steps > 0:
        dm.setup("fit")
        steps_per_epoch = len(dm.train_dataloader())
    states = schedule_states(decomposed, cfg.freeze, freeze_total_units(cfg, steps_per_epoch), history,
                            example_input=x[:1])
    log.info("measuring throughput: batch %d, %d freeze state(s), %d warm-up + %d timed steps", batch,
             len(states), b.warmup, b.steps)
    return measure(cfg, device, original, decomposed, states, x, y)


def measure(cfg: DictConfig, device: DeviceInfo, original: nn.Module, decomposed: nn.Module,
            states: list[FreezeState], x: torch.Tensor, y: torch.Tensor, desc: str = "timing") -> dict[str, Any]:
    """Everything the row says about speed, size and memory, with the run's ``bench`` settings."""
    b = cfg.bench
    fields: dict[str, Any] = {}
    deployed = None
    if b.deploy:
        deployed, fields = deploy(decomposed, x, device=device, precision=bench_precision(cfg),
                                  channels_last=bench_channels_last(cfg), warmup=b.warmup, steps=b.steps)
    orig, dec = compare(original, decomposed, states, x, y, warmup=b.warmup, steps=b.steps, rounds=b.rounds,
                        precision=bench_precision(cfg), channels_last=bench_channels_last(cfg),
                        compile=b.compile, device=device, min_time_s=b.min_time_s, switch_warmup=b.switch_warmup,
                        optimizer_factory=bench_optimizer(cfg), desc=desc, deployed=deployed, latency=b.latency,
                        memory=b.memory)
    return {**comparison_fields(original, decomposed, orig, dec, x), **fields}
