"""``task=advise``: which low-rank configuration is worth training, for this model on this device, before any
fine-tuning.

Every configuration of ``advise.grid`` (config keys: compression, quantization step, rank policy, freeze schedule)
is decomposed once and measured as the benchmark measures: side by side with the original, interleaved, every
freeze state timed and averaged by the time it lasts. Configurations that share a decomposition (the same rank
settings, different schedules) share its preparation and timing. Per configuration: parameter and FLOP ratios,
training speedup, deployed inference speedup, training memory, batch-1 latency, the accuracy proxy (mean relative
approximation error of the weight layers) and, on a labelled dataset, top-1 before fine-tuning on a fixed validation
subset.
The advice itself (table, frontier, recommendation, files) is :mod:`lrd_exp.tasks.advice_report`'s.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from lrd_exp import results
from lrd_exp.config import grid
from lrd_exp.config.schema import MEASURED_IMPORTANCES
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.decompose import DecompositionReport
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.freezing.schedule import FreezeState, schedule_states
from lrd_exp.results.row import STATUS_FAILED, STATUS_OK, make_row
from lrd_exp.tasks.advice_report import (
    UNCHANGED,
    advice_table,
    config_label,
    print_advice,
    speed_column,
    write_advice,
)
from lrd_exp.tasks.decomposition import calibration_inputs, check_fields, check_inputs, decompose_copy
from lrd_exp.tasks.identity import slug
from lrd_exp.tasks.job import JobFailed
from lrd_exp.tasks.measure import compare_states, deploy, speed_fields
from lrd_exp.tasks.models import build_data, run_model
from lrd_exp.tasks.settings import advise_settings, bench_batch_size, bench_precision, freeze_total_units
from lrd_exp.timing.compare import Comparison
from lrd_exp.timing.flops import count_flops, count_params
from lrd_exp.training.trainer import evaluate, validation_images

log = logging.getLogger("lrd_exp")


def advise(cfg: DictConfig, device: DeviceInfo, out_dir: str) -> float | None:
    """Measure every configuration of the grid, write the advice; returns the recommended one's speedup."""
    started = time.perf_counter()
    configs = grid.expand(cfg.advise.grid, cfg, exclude=cfg.advise.exclude)
    applied = [grid.apply(cfg, c) for c in configs]  # every one checked before any work (one line, the bad key)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the same original (and data) as a training job's
    dm = build_data(cfg)
    configs, left_out = measurable(configs, dm)
    calibration = calibration_inputs(cfg, dm)  # the same training images a training job fits to
    evaluation = check_inputs(cfg, dm, calibration)  # and is checked on
    original, top1_original = original_model(cfg, device, dm, out_dir)
    batch = bench_batch_size(cfg)
    x, y = dm.example_batch(batch)
    x, y = x.to(device.torch_device), y.to(device.torch_device)
    original = original.to(device.torch_device)
    size = (count_params(original), count_flops(original, x[:1], train=False))  # each ratio's numerator
    groups = group_by_decomposition(configs)
    log.info("advise: %d configuration(s), %d decomposition(s) of %s; batch %d, %s, %s", len(configs), len(groups),
             cfg.model.name, batch, bench_precision(cfg), device.name)
    notes = measurement_notes(cfg, applied) + ([left_out] if left_out else [])
    for note in notes:
        log.info("advise: %s", note)

    rows: list[dict[str, Any]] = []
    seen: dict[tuple, list[dict[str, Any]]] = {}  # decompositions with identical ranks are measured once
    reference: dict[str, Any] = {}
    bar = tqdm(groups, desc="advise", unit="decomposition", disable=None)  # a bar on a terminal; logs elsewhere
    for i, members in enumerate(bar):
        rank_label = grid.label(rank_keys(members[0]))
        bar.set_postfix_str(rank_label)
        log.info("advise: decomposition %d/%d: %s", i + 1, len(groups), rank_label or "the run's rank config")
        try:
            rows += measure_decomposition(cfg, device, dm, original, size, x, y, members, out_dir, seen,
                                          reference, calibration, evaluation)
        except Exception as exc:
            log.exception("advise: %s failed", rank_label)
            rows += [{**config, "configuration": config_label(config), "status": STATUS_FAILED,
                      "error": f"{type(exc).__name__}: {exc}"} for config in members]
        # an interrupted grid keeps what it measured
        partial = advice_table(cfg, rows, reference, top1_original, device.name)
        results.write_text_atomic(os.path.join(out_dir, "advice.csv"), partial.to_csv(index=False))
    bar.close()

    table = advice_table(cfg, rows, reference, top1_original, device.name)
    val_images = validation_images(dm, subset_config(cfg).trainer.limit_val_batches) if wants_top1(cfg) else None
    command = write_advice(cfg, device, table, out_dir, val_images=val_images, notes=notes,
                           duration_s=time.perf_counter() - started)
    print_advice(cfg, table, command, out_dir)
    failed = [row for row in rows if row["status"] == STATUS_FAILED]
    if failed:
        raise JobFailed(f"{len(failed)} of {len(configs)} configuration(s) failed (advice.csv says why): "
                        f"{failed[0]['error']}")
    rec = table[table["recommended"]]
    return float(rec[speed_column(cfg)].iloc[0]) if len(rec) else None


def measurable(configs: list[dict[str, Any]], dm: Any) -> tuple[list[dict[str, Any]], str]:
    """The configurations this data can measure, and a note on those left out: ``rank.allocation`` global / fastest
    measures each layer's damage on real calibration images, which synthetic data does not have."""
    if dm.has_real_data:
        return configs, ""
    kept = [c for c in configs if c.get("rank.allocation", "uniform") == "uniform"]
    if len(kept) == len(configs):
        return configs, ""
    return kept, (f"{len(configs) - len(kept)} configuration(s) with rank.allocation global / fastest left out: they "
                  f"measure each layer's damage on real calibration images, and dataset={dm.name} has none")


def measurement_notes(cfg: DictConfig, applied: list[DictConfig]) -> list[str]:
    """What a reader of the advice must know about how this grid was measured."""
    notes = []
    measured = sorted({_v(c.freeze.importance) for c in applied
                       if _v(c.freeze.schedule) == "sequential" and _v(c.freeze.importance) in MEASURED_IMPORTANCES})
    if measured:
        notes.append(f"freeze.importance={'/'.join(measured)} is measured during training: here the sequential "
                     "states freeze in depth order (freeze.importance=cost orders them the same here and in training)")
    if not cfg.bench.deploy and cfg.bench.latency:
        notes.append("bench.deploy=false: latency_ms is the factored form's")
    return notes


# ------------------------------------------------------------------------------------------- the original
def original_model(cfg: DictConfig, device: DeviceInfo, dm: Any, out_dir: str) -> tuple[nn.Module, float | None]:
    """The model to decompose, and its top-1 on the validation subset (None without one).

    On a real dataset it is the training job's own baseline (trained once, cached: the recommended command reuses
    it); on synthetic data the model as configured (``model.checkpoint`` / ``model.pretrained`` weights, else its
    random initialisation, whose approximation errors say little about a trained model's).
    """
    if cfg.dataset.name == "synthetic":
        if not (cfg.model.checkpoint or cfg.model.pretrained):
            log.warning("advise: %s has random weights (no model.checkpoint, model.pretrained=false): the accuracy "
                        "proxy then measures random matrices, not what training learned", cfg.model.name)
        return run_model(cfg, device, out_dir, dm).original.eval(), None
    original = run_model(cfg, device, out_dir, dm, train_baseline=True).original
    return original.eval(), subset_top1(cfg, device, original, dm, out_dir) if wants_top1(cfg) else None


def wants_top1(cfg: DictConfig) -> bool:
    """Top-1 means something: real labels (not random tensors) and a validation subset asked for."""
    return cfg.dataset.name != "synthetic" and cfg.advise.val_images > 0


def subset_top1(cfg: DictConfig, device: DeviceInfo, model: nn.Module, dm: Any, out_dir: str) -> float:
    """Top-1 (%) on the first ``advise.val_images`` validation images (the loader's fixed order, no shuffle)."""
    sub = subset_config(cfg)
    return evaluate(sub.trainer, sub.device, device, model, dm, out_dir)


def subset_config(cfg: DictConfig) -> DictConfig:
    """The run's config with validation cut to ``advise.val_images``, rounded up to whole batches, no progress bar."""
    sub = copy.deepcopy(cfg)
    sub.trainer.limit_val_batches = max(1, math.ceil(cfg.advise.val_images / cfg.trainer.batch_size))
    sub.trainer.enable_progress_bar = False
    return sub


# ------------------------------------------------------------------------------------------- the grid
def rank_keys(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k.startswith("rank.")}


def group_by_decomposition(configs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Configurations grouped by their ``rank.*`` keys, in grid order: each group is one decomposition."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for config in configs:
        key = tuple((k, repr(v)) for k, v in rank_keys(config).items())
        groups.setdefault(key, []).append(config)
    return list(groups.values())


def union_states(per_config: list[list[FreezeState]]) -> tuple[list[FreezeState], list[list[tuple[int, float]]]]:
    """The distinct freeze states of several schedules (each timed once), and per schedule (state index, weight)."""
    union: list[FreezeState] = []
    index: dict[tuple[str, ...], int] = {}
    plans = []
    for states in per_config:
        plan = []
        for s in states:
            key = (tuple(sorted(s.frozen)), s.freeze_bias)
            if key not in index:
                index[key] = len(union)
                union.append(FreezeState(1.0, list(s.frozen), s.label, s.freeze_bias))
            plan.append((index[key], s.weight))
        plans.append(plan)
    return union, plans


def measure_decomposition(cfg: DictConfig, device: DeviceInfo, dm: Any, original: nn.Module, size: tuple[int, int],
                          x: torch.Tensor, y: torch.Tensor, members: list[dict[str, Any]], out_dir: str,
                          seen: dict[tuple, list[dict[str, Any]]], reference: dict[str, Any],
                          calibration: list[Any] | None = None, evaluation: list[Any] | None = None
                          ) -> list[dict[str, Any]]:
    """One decomposition (prepared once) and its freeze schedules, timed side by side with the original
    (``size``: the original's parameters and forward FLOPs per sample). ``seen`` holds the rows of earlier ranks
    (the same ranks are measured once); ``reference`` gets the original's own numbers from the first timing."""
    cfgs = [grid.apply(cfg, config) for config in members]
    label = grid.label(rank_keys(members[0])) or "as configured"
    decomposed, report = decompose_group(cfg, cfgs[0], device, dm, original, x, out_dir, label, calibration,
                                         evaluation)
    if not report.decomposed:  # every layer kept dense: this configuration is the original, nothing to time
        log.info("advise: %s decomposes no layer here: it is the original", label)
        return [{**config, "configuration": config_label(config), "params_ratio": 1.0, "approx_error": 0.0,
                 "layers_decomposed": 0, "status": UNCHANGED,
                 "error": "no layer decomposed at these settings (see its decomposition.txt): the original"}
                for config in members]
    signature = tuple((layer.name, tuple(layer.ranks)) for layer in report.decomposed)
    if signature in seen:  # the same ranks as an earlier decomposition: its measurements hold
        log.info("advise: %s has the same ranks as an earlier configuration; its measurements are reused", label)
        return [{**row, **config, "configuration": config_label(config)}
                for config, row in zip(members, seen[signature])]
    log.info("advise: %s: %s", label, report.summary())
    shared: dict[str, Any] = {"params_ratio": size[0] / max(count_params(decomposed), 1),
                              "flops_ratio": size[1] / max(count_flops(decomposed, x[:1], train=False), 1),
                              "approx_error": report.approx_error, "layers_decomposed": len(report.decomposed),
                              **check_columns(report)}
    if wants_top1(cfg):
        shared["top1_pre"] = subset_top1(cfg, device, decomposed, dm, out_dir)
    states, plans = union_states([schedule_states(decomposed, c.freeze, freeze_total_units(c), example_input=x[:1])
                                  for c in cfgs])
    result, merged = time_group(cfg, device, original, decomposed, states, x, y, label)
    shared.update(merged, **inference_fields(result))
    if not reference:  # the original's own numbers, from its first side-by-side measurement
        reference.update(reference_fields(result))
    rows = [{**config, "configuration": config_label(config), **shared,
             **schedule_fields(result, plan, x.shape[0]), "status": STATUS_OK} for config, plan in zip(members, plans)]
    seen[signature] = rows
    return rows


def decompose_group(cfg: DictConfig, first: DictConfig, device: DeviceInfo, dm: Any, original: nn.Module,
                    x: torch.Tensor, out_dir: str, label: str, calibration: list[Any] | None,
                    evaluation: list[Any] | None = None) -> tuple[nn.Module, DecompositionReport]:
    """A group's decomposition (its first configuration's rank settings), its table in ``configs/<label>/``."""
    cdir = os.path.join(out_dir, "configs", folder_name(label))
    return decompose_copy(first, device, dm, original, x[:1], cdir, calibration=calibration, evaluation=evaluation)


def check_columns(report: DecompositionReport) -> dict[str, Any]:
    """The end-to-end check of a configuration: the training job's own columns (null without check inputs), under
    the advice table's names."""
    fields = check_fields(report)
    return {"agreement": fields["check_agreement"], "check_kl": fields["check_kl"],
            "check_error": fields["check_rel_error"]}


def time_group(cfg: DictConfig, device: DeviceInfo, original: nn.Module, decomposed: nn.Module,
               states: list[FreezeState], x: torch.Tensor, y: torch.Tensor, label: str
               ) -> tuple[Comparison, dict[str, Any]]:
    """The group's states (and deployed form, with ``bench.deploy``) timed beside the original, with
    ``advise.warmup`` / ``advise.steps``; returns the comparison and the deployment's shared columns."""
    settings = advise_settings(cfg, device, desc=f"timing {label}")
    deployed, fields = None, {}
    if cfg.bench.deploy:
        deployed, merged = deploy(decomposed, x, settings, steps=max(settings.steps, 5))
        fields["layers_merged"] = merged["layers_merged"]
    return compare_states(original, decomposed, states, x, y, settings, deployed=deployed), fields


#: the advice table's names for the row's (``speed_fields``): the original's own numbers
REFERENCE_NAMES = {"train_ips_original": "train_ips", "infer_ips_original": "infer_ips",
                   "train_mem_mb_original": "train_mem_mb", "latency_ms_original": "latency_ms",
                   "latency_ms_original_p90": "latency_ms_p90"}


def reference_fields(result: Comparison) -> dict[str, Any]:
    """The original's own numbers (the advice table's reference row)."""
    row = speed_fields(result)
    return {name: row.get(key) for key, name in REFERENCE_NAMES.items()}


def inference_fields(result: Comparison) -> dict[str, Any]:
    """Inference speedups (factored and deployed) and the latency of one image, shared by a group's schedules:
    the row's ratios (``make_row``) and the deployed latency (the factored form's when bench.deploy=false)."""
    row = make_row(**speed_fields(result))
    fields = {k: row[k] for k in ("infer_speedup", "infer_speedup_deployed", "infer_ips_deployed")
              if row.get(k) is not None}
    side = "deployed" if row.get("latency_ms_deployed") is not None else "decomposed"
    if row.get(f"latency_ms_{side}") is not None:
        fields.update(latency_ms=row[f"latency_ms_{side}"], latency_ms_p90=row[f"latency_ms_{side}_p90"])
    return fields


def schedule_fields(result: Comparison, plan: list[tuple[int, float]], batch: int) -> dict[str, Any]:
    """One schedule's training speed (its states' step times weighted by ``plan``) and peak memory."""
    stages = result.decomposed.stages
    step_s = sum(w * batch / stages[i]["train_ips"] for i, w in plan)  # the schedule's time-weighted step
    mem = [stages[i]["train_mem_mb"] for i, _ in plan if stages[i]["train_mem_mb"] is not None]
    return {"train_ips": batch / step_s, "train_speedup": batch / step_s / result.original.train.ips,
            "train_mem_mb": max(mem) if mem else None}


def folder_name(label: str) -> str:
    """``configs/<label>``, made safe, with a short hash so that two long labels never share a folder."""
    return f"{slug(label)[:60]}-{hashlib.sha1(label.encode()).hexdigest()[:6]}"


__all__ = ["advise", "group_by_decomposition", "measure_decomposition", "union_states"]
