"""The measure stage of a job: the original and the decomposed model (with its freeze schedule) side by side, with
the run's ``bench`` settings, as row fields.

The timing itself is :mod:`lrd_exp.timing.compare`'s; here a freeze schedule's states are applied as training
applies them, the deployed form is built, and the comparison becomes the row's size, speed and memory columns.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lrd_exp.config.schema import enum_value as _v
from lrd_exp.deploy.merge import merge_for_inference
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.freezing.factors import collect_factors, frozen_parameters, set_frozen
from lrd_exp.freezing.schedule import FreezeState, schedule_states
from lrd_exp.tasks.settings import bench_batch_size, bench_settings, freeze_total_units
from lrd_exp.timing.compare import CompareSettings, Comparison, compare
from lrd_exp.timing.flops import count_flops, count_params

log = logging.getLogger("lrd_exp")


def freeze_setter(decomposed: nn.Module) -> Callable[[FreezeState], None]:
    """Puts ``decomposed`` into a freeze state as training does (``freeze_bias`` included); what was frozen before
    the benchmark stays frozen in every state."""
    factors = collect_factors(decomposed)
    by_key = {f.key: f for f in factors}
    user_frozen = frozen_parameters(factors)

    def apply(state: FreezeState) -> None:
        set_frozen(factors, [by_key[k] for k in state.frozen if k in by_key], state.freeze_bias,
                   keep_frozen=user_frozen)

    return apply


def compare_states(original: nn.Module, decomposed: nn.Module, states: list[FreezeState], x: torch.Tensor,
                   y: torch.Tensor, settings: CompareSettings | None = None,
                   deployed: nn.Module | None = None) -> Comparison:
    """:func:`lrd_exp.timing.compare.compare` over a freeze schedule's states, each applied as training applies it."""
    return compare(original, decomposed, states, x, y, settings, set_state=freeze_setter(decomposed),
                   deployed=deployed)


def comparison_fields(original: nn.Module, decomposed: nn.Module, result: Comparison,
                      x: torch.Tensor) -> dict[str, Any]:
    """Result-row fields (size and speed) of a comparison."""
    one = x[:1]
    return {"params_original": count_params(original), "params_decomposed": count_params(decomposed),
            "flops_original": count_flops(original, one, train=False),
            "flops_decomposed": count_flops(decomposed, one, train=False), **speed_fields(result)}


def speed_fields(result: Comparison) -> dict[str, Any]:
    """The one mapping of a :class:`Comparison` to row fields (names of ``lrd_exp.results.row``): images/s and
    their round ranges, latency, training FLOPs and memory; the speedups follow from them (``make_row``)."""
    orig, dec, deployed = result.original, result.decomposed, result.deployed
    row: dict[str, Any] = {"train_flops_original": orig.train_flops, "train_flops_decomposed": dec.train_flops,
                           "freeze_stages": dec.stages, "bench_round_spread": orig.round_spread}
    for kind, a, b in (("train", orig.train, dec.train), ("infer", orig.infer, dec.infer)):
        if a is None or b is None:
            continue
        row[f"{kind}_ips_original"], row[f"{kind}_ips_decomposed"] = a.ips, b.ips
        row[f"{kind}_ips_original_min"], row[f"{kind}_ips_original_max"] = a.ips_min, a.ips_max
        row[f"{kind}_ips_decomposed_min"], row[f"{kind}_ips_decomposed_max"] = b.ips_min, b.ips_max
    if deployed.infer is not None:
        row["infer_ips_deployed"] = deployed.infer.ips
    for side, timing in (("original", orig.latency), ("decomposed", dec.latency), ("deployed", deployed.latency)):
        if timing is not None:
            row[f"latency_ms_{side}"] = timing.median_s * 1e3
            row[f"latency_ms_{side}_p90"] = timing.quantile_s(0.9) * 1e3
    if orig.memory_mb is not None:
        row.update(train_mem_mb_original=orig.memory_mb, train_mem_mb_decomposed=dec.memory_mb,
                   train_mem_kind=orig.memory_kind)
    return row


def deploy(decomposed: nn.Module, x: torch.Tensor, settings: CompareSettings, *, steps: int
           ) -> tuple[nn.Module, dict[str, Any]]:
    """The deployed form (each layer factored or merged, whichever infers faster here, ``steps`` timed steps per
    form) and its row fields."""
    deployed = copy.deepcopy(decomposed).eval()
    report = merge_for_inference(deployed, x, device=settings.device, precision=settings.precision,
                                 channels_last=settings.channels_last, warmup=settings.warmup, steps=steps)
    log.info("%s", report.summary())
    return deployed, {"layers_merged": report.layers_merged, "merge_report": report.layers}


def measure_pair(cfg: DictConfig, device: DeviceInfo, original: nn.Module, decomposed: nn.Module, dm: Any,
                 history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A training job's measure stage: the schedule's states as its fine-tuning went through them (``history``)."""
    b = cfg.bench
    batch = bench_batch_size(cfg)
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
    settings = bench_settings(cfg, device, desc)
    fields: dict[str, Any] = {}
    deployed = None
    if cfg.bench.deploy:
        deployed, fields = deploy(decomposed, x, settings, steps=max(settings.steps // 4, 5))
    result = compare_states(original, decomposed, states, x, y, settings, deployed=deployed)
    return {**comparison_fields(original, decomposed, result, x), **fields}
