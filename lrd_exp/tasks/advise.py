"""``task=advise``: which low-rank configuration is worth training, for this model on this device, before any
fine-tuning.

Every configuration of ``advise.grid`` (config keys: compression, quantization step, rank policy, freeze schedule)
is decomposed once and measured as the benchmark measures: side by side with the original, interleaved, every
freeze state timed and averaged by the time it lasts. Configurations that share a decomposition (the same rank
settings, different schedules) share its preparation and timing. Per configuration: parameter and FLOP ratios,
training speedup, deployed inference speedup, training memory, batch-1 latency, the accuracy proxy (mean relative
approximation error per layer) and, on a labelled dataset, top-1 before fine-tuning on a fixed validation subset.
Output: ``advice.csv``, ``advice.md`` (frontier marked), ``advice_frontier.png`` and the command that trains the
recommended configuration.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import shlex
import sys
import time
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from lrd_exp import results
from lrd_exp.config import grid
from lrd_exp.config.schema import MEASURED_IMPORTANCES as MEASURED
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.decompose import decompose_model
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.freezing.schedule import FreezeState, schedule_states
from lrd_exp.results.pareto import pareto_mask, recommend
from lrd_exp.tasks.common import (
    JobFailed,
    bench_channels_last,
    bench_optimizer,
    bench_precision,
    build_model,
    freeze_total_units,
    git_commit,
    rank_search_context,
)
from lrd_exp.tasks.measure import compare, deploy
from lrd_exp.tasks.train import baseline
from lrd_exp.timing.flops import count_flops, count_params
from lrd_exp.training.data import build_datamodule
from lrd_exp.training.trainer import evaluate, validation_images

log = logging.getLogger("lrd_exp")

ORIGINAL = "original"
#: advice.csv's measured columns, in order (the grid's keys come first, then these).
COLUMNS = ["configuration", "params_ratio", "flops_ratio", "train_speedup", "infer_speedup",
           "infer_speedup_deployed", "train_mem_mb", "latency_ms", "latency_ms_p90", "approx_error", "top1_pre",
           "layers_decomposed", "layers_merged", "train_ips", "infer_ips_deployed", "frontier", "recommended",
           "status", "error"]


def advise(cfg: DictConfig, device: DeviceInfo, out_dir: str) -> float | None:
    """Measure every configuration of the grid, write the advice; returns the recommended one's speedup."""
    started = time.perf_counter()
    configs = grid.expand(cfg.advise.grid, cfg)
    applied = [grid.apply(cfg, c) for c in configs]  # every one checked before any work (one line, the bad key)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the same original (and data) as a training job's
    dm = build_datamodule(cfg.dataset, batch_size=cfg.trainer.batch_size, seed=cfg.seed, data_dir=cfg.paths.data_dir)
    original, top1_original = original_model(cfg, device, dm, out_dir)
    batch = cfg.bench.batch_size or cfg.trainer.batch_size
    x, y = dm.example_batch(batch)
    x, y = x.to(device.torch_device), y.to(device.torch_device)
    original = original.to(device.torch_device)
    groups = group_by_decomposition(configs)
    log.info("advise: %d configuration(s), %d decomposition(s) of %s; batch %d, %s, %s", len(configs), len(groups),
             cfg.model.name, batch, bench_precision(cfg), device.name)

    rows: list[dict[str, Any]] = []
    measured: dict[tuple, list[dict[str, Any]]] = {}  # decompositions with identical ranks are measured once
    reference: dict[str, Any] = {}
    if any(_v(c.freeze.schedule) == "sequential" and _v(c.freeze.importance) in MEASURED for c in applied):
        log.info("advise: freeze.importance=%s is measured during training, so sequential states freeze in depth "
                 "order here (freeze.importance=cost is the same here and in training)", _v(cfg.freeze.importance))
    bar = tqdm(groups, desc="advise", unit="decomposition", disable=None)  # a bar on a terminal; logs elsewhere
    for i, members in enumerate(bar):
        rank_label = grid.label({k: v for k, v in members[0].items() if k.startswith("rank.")})
        bar.set_postfix_str(rank_label)
        log.info("advise: decomposition %d/%d: %s", i + 1, len(groups), rank_label or "the run's rank config")
        try:
            rows += measure_decomposition(cfg, device, dm, original, x, y, members, out_dir, measured, reference)
        except Exception as exc:
            log.exception("advise: %s failed", grid.label(members[0]))
            rows += [{**config, "configuration": grid.label(config), "status": "failed",
                      "error": f"{type(exc).__name__}: {exc}"} for config in members]
    bar.close()

    table = advice_table(cfg, rows, reference, top1_original)
    val_images = validation_images(subset_config(cfg), dm) if labelled(cfg) else None
    command = write_advice(cfg, device, table, out_dir, val_images=val_images,
                           duration_s=time.perf_counter() - started)
    print_advice(cfg, table, command, out_dir)
    failed = table[table["status"] == "failed"]
    if len(failed):
        raise JobFailed(f"{len(failed)} of {len(configs)} configuration(s) failed (advice.csv says why): "
                        f"{failed['error'].iloc[0]}")
    rec = table[table["recommended"]]
    return float(rec[speed_column(cfg)].iloc[0]) if len(rec) else None


# ------------------------------------------------------------------------------------------- the original
def original_model(cfg: DictConfig, device: DeviceInfo, dm: Any, out_dir: str) -> tuple[nn.Module, float | None]:
    """The model to decompose, and its top-1 on the validation subset (None without labels).

    On a labelled dataset it is the training job's own baseline (trained once, cached: the recommended command
    reuses it); on synthetic data the model as configured (``model.checkpoint`` / ``model.pretrained`` weights,
    else its random initialisation, whose approximation errors say little about a trained model's).
    """
    shape = {"num_classes": dm.num_classes, "in_chans": dm.in_chans, "image_size": dm.image_size}
    if not labelled(cfg):
        if not (cfg.model.checkpoint or cfg.model.pretrained):
            log.warning("advise: %s has random weights (no model.checkpoint, model.pretrained=false): the accuracy "
                        "proxy then measures random matrices, not what training learned", cfg.model.name)
        return build_model(cfg, **shape).eval(), None
    original, _, _ = baseline(cfg, device, dm, out_dir)
    return original.eval(), subset_top1(cfg, device, original, dm, out_dir)


def labelled(cfg: DictConfig) -> bool:
    """Top-1 means something: a real dataset (not random tensors) and a validation subset asked for."""
    return cfg.dataset.name != "synthetic" and cfg.advise.val_images > 0


def subset_top1(cfg: DictConfig, device: DeviceInfo, model: nn.Module, dm: Any, out_dir: str) -> float:
    """Top-1 (%) on the first ``advise.val_images`` validation images (the loader's fixed order, no shuffle)."""
    return evaluate(subset_config(cfg), device, model, dm, out_dir)


def subset_config(cfg: DictConfig) -> DictConfig:
    """The run's config with validation cut to ``advise.val_images`` (whole batches) and no progress bar."""
    sub = copy.deepcopy(cfg)
    sub.trainer.limit_val_batches = max(1, math.ceil(cfg.advise.val_images / cfg.trainer.batch_size))
    sub.trainer.enable_progress_bar = False
    return sub


# ------------------------------------------------------------------------------------------- the grid
def group_by_decomposition(configs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Configurations grouped by their ``rank.*`` keys, in grid order: each group is one decomposition."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for config in configs:
        key = tuple((k, repr(v)) for k, v in config.items() if k.startswith("rank."))
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


def measure_decomposition(cfg: DictConfig, device: DeviceInfo, dm: Any, original: nn.Module, x: torch.Tensor,
                          y: torch.Tensor, members: list[dict[str, Any]], out_dir: str,
                          measured: dict[tuple, list[dict[str, Any]]], reference: dict[str, Any]
                          ) -> list[dict[str, Any]]:
    """One decomposition (prepared once) and its freeze schedules, timed side by side with the original."""
    a, b = cfg.advise, cfg.bench
    cfgs = [grid.apply(cfg, config) for config in members]
    rank_cfg = cfgs[0]
    rank_keys = {k: v for k, v in members[0].items() if k.startswith("rank.")}
    cdir = os.path.join(out_dir, "configs", _slug(grid.label(rank_keys) or "run"))
    os.makedirs(cdir, exist_ok=True)
    decomposed = copy.deepcopy(original)
    report = decompose_model(decomposed, **rank_cfg.rank, example_input=x[:1],
                             rank_search=rank_search_context(rank_cfg, device, dm) | {"output_dir": cdir})
    results.write_text_atomic(os.path.join(cdir, "decomposition.txt"), report.table(max_rows=None) + "\n")
    signature = tuple((layer.name, tuple(layer.ranks)) for layer in report.decomposed)
    shared: dict[str, Any] = {"params_ratio": count_params(original) / max(count_params(decomposed), 1),
                              "flops_ratio": count_flops(original, x[:1], train=False)
                              / max(count_flops(decomposed, x[:1], train=False), 1),
                              "approx_error": report.approx_error, "layers_decomposed": len(report.decomposed)}
    if signature in measured:  # the same ranks as an earlier decomposition: its measurements hold
        log.info("advise: %s has the same ranks as an earlier configuration; its measurements are reused",
                 grid.label(rank_keys))
        return [{**config, **{k: v for k, v in row.items() if k not in config}}
                for config, row in zip(members, measured[signature])]
    log.info("advise: %s: %s", grid.label(rank_keys), report.summary())
    if labelled(cfg):
        shared["top1_pre"] = subset_top1(cfg, device, decomposed, dm, out_dir)

    per_config = [schedule_states(decomposed, c.freeze, freeze_total_units(c), example_input=x[:1]) for c in cfgs]
    states, plans = union_states(per_config)
    kw = dict(precision=bench_precision(cfg), channels_last=bench_channels_last(cfg))
    deployed = None
    if b.deploy:
        deployed, fields = deploy(decomposed, x, device=device, warmup=a.warmup, steps=a.steps * 4, **kw)
        shared["layers_merged"] = fields["layers_merged"]
    orig, dec = compare(original, decomposed, states, x, y, warmup=a.warmup, steps=a.steps, compile=b.compile,
                        device=device, switch_warmup=b.switch_warmup, optimizer_factory=bench_optimizer(cfg),
                        desc=f"timing {grid.label(rank_keys)}", deployed=deployed, latency=b.latency,
                        memory=b.memory, **kw)
    if not reference:  # the original's own numbers, from its first side-by-side measurement
        reference.update(train_ips=orig.train.ips, infer_ips=orig.infer.ips if orig.infer else None,
                         train_mem_mb=orig.memory_mb, train_mem_kind=orig.memory_kind,
                         latency_ms=orig.latency.median_s * 1e3 if orig.latency else None,
                         latency_ms_p90=orig.latency.quantile_s(0.9) * 1e3 if orig.latency else None)
    if orig.infer is not None and dec.infer is not None:
        shared["infer_speedup"] = dec.infer.ips / orig.infer.ips
        if dec.deployed_infer is not None:
            shared["infer_speedup_deployed"] = dec.deployed_infer.ips / orig.infer.ips
            shared["infer_ips_deployed"] = dec.deployed_infer.ips
    latency = dec.deployed_latency or dec.latency
    if latency is not None:
        shared.update(latency_ms=latency.median_s * 1e3, latency_ms_p90=latency.quantile_s(0.9) * 1e3)
    rows = []
    for config, plan in zip(members, plans):
        step_s = sum(w * x.shape[0] / dec.stages[i]["train_ips"] for i, w in plan)  # time-weighted step time
        mem = [dec.stages[i]["train_mem_mb"] for i, _ in plan if dec.stages[i]["train_mem_mb"] is not None]
        rows.append({**config, "configuration": grid.label(config), **shared,
                     "train_ips": x.shape[0] / step_s, "train_speedup": x.shape[0] / step_s / orig.train.ips,
                     "train_mem_mb": max(mem) if mem else None, "status": "ok"})
    measured[signature] = rows
    return rows


# ------------------------------------------------------------------------------------------- the advice
def speed_column(cfg: DictConfig) -> str:
    return "train_speedup" if _v(cfg.advise.speed) == "train" else "infer_speedup_deployed"


def advice_table(cfg: DictConfig, rows: list[dict[str, Any]], reference: dict[str, Any],
                 top1_original: float | None) -> pd.DataFrame:
    """The configurations and the original (the reference point: speedup 1, error 0), frontier and pick marked."""
    keys = list(grid.axes(cfg.advise.grid))
    base = {"configuration": ORIGINAL, "params_ratio": 1.0, "flops_ratio": 1.0, "train_speedup": 1.0,
            "infer_speedup": 1.0, "infer_speedup_deployed": 1.0, "approx_error": 0.0, "top1_pre": top1_original,
            "layers_decomposed": 0, "layers_merged": 0, "train_ips": reference.get("train_ips"),
            "infer_ips_deployed": reference.get("infer_ips"), "train_mem_mb": reference.get("train_mem_mb"),
            "latency_ms": reference.get("latency_ms"), "latency_ms_p90": reference.get("latency_ms_p90"),
            "status": "ok" if reference else "failed", "error": None if reference else "nothing was measured"}
    df = pd.DataFrame([base, *rows])
    for col in keys + COLUMNS:
        if col not in df.columns:
            df[col] = None
    df = df[keys + COLUMNS + [c for c in df.columns if c not in keys + COLUMNS]]
    ok = df["status"] == "ok"
    speed = speed_column(cfg)
    numeric = df[[speed, "approx_error"]].apply(pd.to_numeric, errors="coerce").where(ok)
    df["frontier"] = pareto_mask(numeric, speed, "approx_error")
    pick = recommend(numeric, speed, "approx_error", max_error=cfg.advise.max_error,
                     candidates=(df["configuration"] != ORIGINAL) & (numeric[speed] > 1.0))
    df["recommended"] = df.index == pick if pick is not None else False
    for i, (col, value) in enumerate((("model", cfg.model.name), ("dataset", cfg.dataset.name), ("seed", cfg.seed))):
        df.insert(i, col, value)
    return df


def recommended_command(cfg: DictConfig, row: pd.Series) -> str:
    """``python run.py <the run's own overrides> <the configuration's keys>``: trains what was recommended."""
    keys = [k for k in grid.axes(cfg.advise.grid)]
    config = {k: row[k] for k in keys}
    own = []
    if HydraConfig.initialized():
        for item in HydraConfig.get().overrides.task:
            key = item.split("=", 1)[0].lstrip("+~")
            if key == "task" or key.startswith("advise.") or key == "advise" or key in config:
                continue
            own.append(item)
    return " ".join(["python run.py", *map(shlex.quote, own), *map(shlex.quote, grid.overrides(config))])


FORMATS = {"params_ratio": "{:.2f}", "flops_ratio": "{:.2f}", "train_speedup": "{:.2f}", "infer_speedup": "{:.2f}",
           "infer_speedup_deployed": "{:.2f}", "train_mem_mb": "{:,.0f}", "latency_ms": "{:.2f}",
           "latency_ms_p90": "{:.2f}", "approx_error": "{:.3f}", "top1_pre": "{:.1f}", "train_ips": "{:,.1f}",
           "infer_ips_deployed": "{:,.1f}"}


def markdown(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown: numbers rounded, missing as '-', the frontier and the pick in words."""
    shown = table.drop(columns=["model", "dataset", "seed", "error"]).copy()  # the header says those
    for col, fmt in FORMATS.items():
        shown[col] = [fmt.format(v) if isinstance(v, (int, float)) and math.isfinite(v) else "-"
                      for v in pd.to_numeric(shown[col], errors="coerce")]
    shown["frontier"] = shown["frontier"].map({True: "yes", False: ""})
    shown["recommended"] = shown["recommended"].map({True: "**yes**", False: ""})
    return shown.fillna("-").to_markdown(index=False)


def write_advice(cfg: DictConfig, device: DeviceInfo, table: pd.DataFrame, out_dir: str, *,
                 val_images: int | None, duration_s: float) -> str | None:
    """advice.csv, advice.md and advice_frontier.png; returns the recommended command (None: nothing to train)."""
    from lrd_exp.results.figures import advice_frontier  # matplotlib only when the advice is written

    speed = speed_column(cfg)
    results.write_text_atomic(os.path.join(out_dir, "advice.csv"), table.to_csv(index=False))
    rec = table[table["recommended"]]
    command = recommended_command(cfg, rec.iloc[0]) if len(rec) else None
    batch = cfg.bench.batch_size or cfg.trainer.batch_size
    size = cfg.model.image_size or cfg.dataset.image_size
    accuracy = (f"top1_pre: top-1 (%) before fine-tuning on the first {val_images} validation images"
                if val_images else "no top-1 (no labelled dataset)")
    how = ("the fastest frontier configuration with approx_error <= " f"{cfg.advise.max_error}"
           if cfg.advise.max_error is not None else "the frontier's knee")
    lines = [
        f"# Advice: {cfg.model.name} on {device.name}",
        "",
        f"- command: `{' '.join(['python run.py', *_overrides()])}`",
        f"- date (UTC): {pd.Timestamp.now(tz='UTC').strftime('%Y-%m-%dT%H:%M:%SZ')}; commit: {git_commit()}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); took {duration_s / 60:.1f} min",
        f"- measured without fine-tuning, side by side with the original: batch {batch}, {bench_precision(cfg)}, "
        f"input {cfg.dataset.in_chans}x{size}x{size}, {cfg.advise.steps} timed steps per model / freeze state; "
        "speedups are ratios of medians (on a noisy host good to about +-15 %)",
        f"- frontier: no other row is both faster ({speed}) and closer to the original (approx_error: the mean "
        f"relative approximation error per layer, the accuracy proxy); {accuracy}",
        "",
        markdown(table),
        "",
    ]
    if command:
        r = rec.iloc[0]
        lines += [f"**Recommended: {r['configuration']}** ({speed} {r[speed]:.2f}x, approx_error "
                  f"{r['approx_error']:.3f}: {how}). Train it with:", "", "```", command, "```", ""]
    else:
        lines += [f"**No recommendation**: no frontier configuration is faster than the original here ({how}).", ""]
    results.write_text_atomic(os.path.join(out_dir, "advice.md"), "\n".join(lines))
    advice_frontier(table.assign(device_name=device.name), os.path.join(out_dir, "advice_frontier.png"),
                    speed=speed)
    return command


def print_advice(cfg: DictConfig, table: pd.DataFrame, command: str | None, out_dir: str) -> None:
    speed = speed_column(cfg)
    cols = {"configuration": "configuration", "params_ratio": "params x", "flops_ratio": "FLOPs x",
            "train_speedup": "train speedup", "infer_speedup_deployed": "infer speedup (deployed)",
            "train_mem_mb": "train MiB", "latency_ms": "latency ms", "approx_error": "approx error",
            "top1_pre": "top-1 before FT", "frontier": "frontier", "status": "status"}
    df = table.sort_values(speed, ascending=False, na_position="last")
    df = df[[c for c in cols if c in df.columns and df[c].notna().any()]].copy()
    df["frontier"] = df["frontier"].map({True: "*", False: ""})
    df.loc[table["recommended"], "frontier"] = "* <- recommended"
    print(f"\nAdvice ({cfg.model.name}; speedups vs the original, measured side by side, no fine-tuning):")
    print(df.rename(columns=cols).to_string(index=False, float_format=lambda v: f"{v:,.3f}"))
    if command:
        print(f"\nTrain the recommended configuration:\n  {command}")
    else:
        print("\nNo configuration on the frontier is faster than the original here.")
    print(f"advice: {os.path.join(out_dir, 'advice.md')} (table: advice.csv, figure: advice_frontier.png)")
    sys.stdout.flush()


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label)[:80]


__all__ = ["advise", "advice_table", "group_by_decomposition", "union_states"]
