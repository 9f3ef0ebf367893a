"""``task=benchmark``: throughput only, no training, on synthetic data of the model's real input shape.

The original and each decomposed variant (the run's rank policy and freeze schedule, or ``bench.variants``)
are measured in the same process, interleaved; every state of a freeze schedule is measured and averaged by
the time it lasts. Rows use the result schema with the accuracy columns empty.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from lrd_exp import results
from lrd_exp.config.schema import MEASURED_IMPORTANCES as MEASURED
from lrd_exp.config.schema import enum_value
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.freezing.schedule import schedule_states
from lrd_exp.results.row import STATUS_OK
from lrd_exp.sweep.guard import warn_parallel_throughput
from lrd_exp.tasks.decomposition import decompose_copy, require_decomposed
from lrd_exp.tasks.identity import identity_row, slug
from lrd_exp.tasks.job import JobRow
from lrd_exp.tasks.measure import measure
from lrd_exp.tasks.models import run_model
from lrd_exp.tasks.settings import bench_batch_size, bench_precision, freeze_total_units
from lrd_exp.training.preprocessing import input_columns

log = logging.getLogger("lrd_exp")


def variant_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """(label, cfg) for the run's own variant, then one per ``bench.variants`` entry (rank / freeze overrides)."""
    out = [(f"{enum_value(cfg.rank.policy)}+{enum_value(cfg.freeze.schedule)}", cfg)]
    for i, spec in enumerate(cfg.bench.variants):
        spec = OmegaConf.to_container(spec, resolve=True)
        label = str(spec.pop("label", f"variant{i + 1}"))
        vcfg = copy.deepcopy(cfg)
        for key in ("rank", "freeze"):
            if key in spec:
                vcfg[key] = OmegaConf.merge(vcfg[key], spec.pop(key))
        if spec:
            raise ValueError(f"bench.variants[{i}] has unknown keys {sorted(spec)}: allowed are label, rank, freeze")
        out.append((label, vcfg))
    return out


def benchmark(cfg: DictConfig, device: DeviceInfo, out_dir: str) -> float | None:
    """Time the original and every variant; one row per variant, a printed table and ``freeze_stages.csv``."""
    parallel = warn_parallel_throughput(cfg)  # other jobs of the sweep timing on this machine at the same time
    d = cfg.dataset
    torch.manual_seed(cfg.seed)
    run = run_model(cfg, device, out_dir)  # a model file's decomposed model is not read: its original is timed
    batch, size = bench_batch_size(cfg), cfg.model.image_size or run.shape["image_size"]
    original = run.original
    x = torch.randn(batch, d.in_chans, size, size, device=device.torch_device)
    y = torch.randint(0, d.num_classes, (batch,), device=device.torch_device)
    original = original.to(device.torch_device)
    if enum_value(cfg.rank.fit) != "weights":
        log.info("benchmark: random inputs, no calibration images: the factors are fitted to the weights (rank.fit "
                 "changes accuracy only, not speed)")
    rows, stage_rows = [], []
    for i, (label, vcfg) in enumerate(variant_configs(cfg)):
        vdir = out_dir if i == 0 else os.path.join(out_dir, "variants", slug(label))
        row = identity_row(vcfg, out_dir)
        row.update(device=device.accelerator, device_name=device.name, precision=bench_precision(cfg),
                   batch_size=batch, variant=label, parallel_jobs=parallel, output_dir=vdir, **input_columns(size))
        with JobRow(row, vdir, what=f"benchmark variant {label}", summary=False) as job:
            row.update(measure_variant(vcfg, device, original, x, y, label, vdir))
            stage_rows += [{"variant": label, **st} for st in row["freeze_stages"]]
        rows.append(job.final)
    print_benchmark(rows, stage_rows)
    if stage_rows:
        results.write_text_atomic(os.path.join(out_dir, "freeze_stages.csv"),
                                  pd.DataFrame(stage_rows).to_csv(index=False))
    first = rows[0]
    return first.get("train_ips_decomposed") if first["status"] == STATUS_OK else None


def measure_variant(vcfg: DictConfig, device: DeviceInfo, original: torch.nn.Module, x: torch.Tensor,
                    y: torch.Tensor, label: str, vdir: str) -> dict[str, Any]:
    """One variant decomposed (to the weights: speed depends on the ranks only) and timed beside the original."""
    rank = {**vcfg.rank, "fit": "weights"}  # speed depends on the ranks only, not on what they were fitted to
    decomposed, report = decompose_copy(vcfg, device, None, original, x[:1], vdir, rank=rank)
    require_decomposed(vcfg, report)
    states = schedule_states(decomposed, vcfg.freeze, freeze_total_units(vcfg), example_input=x[:1])
    log.info("benchmark %s: %s; %d freeze state(s)", label, report.summary(), len(states))
    importance = enum_value(vcfg.freeze.get("importance"))
    if len(states) > 1 and enum_value(vcfg.freeze.schedule) == "sequential" and importance in MEASURED:
        log.info("benchmark %s: freeze.importance=%s is measured during training, so these states freeze "
                 "in depth order (a training job's own benchmark follows its real order; "
                 "freeze.importance=cost is the same here and in training)", label, importance)
    return measure(vcfg, device, original, decomposed, states, x, y, desc=f"timing {label}")


def print_benchmark(rows: list[dict[str, Any]], stage_rows: list[dict[str, Any]]) -> None:
    cols = {"variant": "variant", "params_ratio": "params x", "train_ips_original": "train ips orig",
            "train_ips_decomposed": "train ips LRD", "train_speedup": "train speedup",
            "flops_speedup_train": "FLOP-pred. train", "infer_ips_original": "infer ips orig",
            "infer_ips_decomposed": "infer ips LRD", "infer_speedup": "infer speedup",
            "infer_speedup_deployed": "infer speedup deployed", "latency_ms_original": "latency ms orig",
            "latency_ms_deployed": "latency ms deployed", "train_mem_mb_original": "train MiB orig",
            "train_mem_mb_decomposed": "train MiB LRD",
            "flops_speedup_infer": "FLOP-pred. infer", "status": "status"}
    df = pd.DataFrame(rows)
    df = df[[c for c in cols if c in df.columns]].rename(columns=cols)
    device = rows[0].get("device_name") if rows else ""
    print(f"\nBenchmark ({rows[0].get('model')}, batch {rows[0].get('batch_size')}, {rows[0].get('precision')}, "
          f"{device}); speedups are LRD / original, measured side by side:")
    print(df.to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    for row in rows:
        note = results.unstable_note(row)
        if note:
            print(f"{row.get('variant')}: {note}")
    if stage_rows:
        st = pd.DataFrame(stage_rows)[
            ["variant", "label", "weight", "n_frozen", "train_ips", "train_flops", "train_mem_mb"]]
        st["train_flops"] = st["train_flops"] / 1e9
        print("\nFreeze states (time-weighted into the rows above):")
        print(st.rename(columns={"train_flops": "train GFLOP/step"}).to_string(
            index=False, float_format=lambda v: f"{v:,.3f}"))
