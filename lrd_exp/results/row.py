"""The row contract: one flat ``result.json`` per job, the columns every row has, and the derived ratios.

Rows are flat dicts so that CSV, Markdown, pandas and W&B all see the same columns; nested config goes in
JSON-string columns.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from lrd_exp.results.atomic import json_default, jsonable
from lrd_exp.results.files import RESULT_FILENAME as RESULT_FILENAME  # re-exported: where the row lives

IDENTITY_COLUMNS: list[str] = [
    "model",
    "dataset",
    "task",
    "variant",  # the paper's variant (variant= group) or the benchmark's bench.variants label
    "rank_policy",
    "rank_ratio",
    "rank_energy",
    "rank_multiple",
    "rank_params",  # JSON string of the whole rank node
    "freeze",
    "freeze_params",  # JSON string of the whole freeze node
    "device",
    "device_name",
    "precision",
    "batch_size",
    "channels_last",  # memory layout the speeds were measured in
    "malloc",  # host allocator the speeds were measured under (device.malloc: tuned | system)
    "seed",
    "git_commit",
    "overrides",  # e.g. "rank.policy=quantized freeze=sequential"
    "time",  # ISO-8601
    "output_dir",
    "baseline_cache_hit",
]
INPUT_COLUMNS: list[str] = [  # the input pipeline the model was fed (lrd_exp.training.preprocessing)
    "input_size",  # side of the square input, pixels
    "input_mean",  # per-channel mean / std of the normalisation, JSON lists; null: not normalised (synthetic)
    "input_std",
    "input_crop_pct",  # fraction of the resized image the centre crop keeps (1.0: all of it)
    "input_crop_mode",  # timm's: center | squash | border
    "input_interpolation",  # of the resize: bilinear, bicubic, ...
]
SIZE_COLUMNS: list[str] = [
    "params_original",
    "params_decomposed",
    "params_ratio",  # original / decomposed
    "flops_original",  # forward FLOPs per image
    "flops_decomposed",
    "train_flops_original",  # per training step at batch_size
    "train_flops_decomposed",  # with its freeze schedule, time-weighted
    "flops_speedup_train",  # FLOP-predicted: original / decomposed
    "flops_speedup_infer",
]
SPEED_COLUMNS: list[str] = [
    "train_ips_original",
    "train_ips_decomposed",
    "train_speedup",  # decomposed / original images/s
    "infer_ips_original",
    "infer_ips_decomposed",
    "infer_speedup",
    "train_ips_original_min",
    "train_ips_original_max",
    "train_ips_decomposed_min",
    "train_ips_decomposed_max",
    "infer_ips_original_min",
    "infer_ips_original_max",
    "infer_ips_decomposed_min",
    "infer_ips_decomposed_max",
    "train_ips_logged",  # what the Lightning fine-tuning loop achieved (training jobs)
    "train_ips_fidelity",  # logged / benchmark (train_ips_decomposed): 1.0 = no hidden framework bottleneck
    "train_ips_probe",  # benchmark images/s at the loop's batch, timed around each of its epochs (bench.probe_steps)
    "train_ips_fidelity_paired",  # logged / probe, epoch by epoch: the fidelity with the machine's drift paired out
    "train_loop_overhead",  # share of the loop's step wall time before the step starts (loading, hooks, logging)
    "bench_round_spread",  # (max-min)/median of block medians of the original's training steps: machine drift
]
DEPLOY_COLUMNS: list[str] = [
    "infer_ips_deployed",  # the decomposed model with each layer in its faster form (factored or merged)
    "infer_speedup_deployed",  # deployed / original images/s
    "layers_merged",  # decomposed layers whose merged dense form was faster for inference
    "latency_ms_original",  # inference of one image: median and 90th percentile, ms
    "latency_ms_original_p90",
    "latency_ms_decomposed",
    "latency_ms_decomposed_p90",
    "latency_ms_deployed",
    "latency_ms_deployed_p90",
]
MEMORY_COLUMNS: list[str] = [
    "train_mem_mb_original",  # MiB one training step needs
    "train_mem_mb_decomposed",  # the largest over the freeze schedule's states (each state: freeze_stages)
    # "allocator peak" (CUDA / NPU) or "counted" (CPU: params, grads, optimizer state, saved activations)
    "train_mem_kind",
]
QUALITY_COLUMNS: list[str] = [
    "top1_original",
    "top1_decomposed_pre",  # before fine-tuning
    "top1_decomposed",  # after fine-tuning
    "top1_drop",  # original - decomposed (after fine-tune), in points
    "val_images",  # validation images every top-1 rests on: one image = 100 / val_images points
    "fit",  # what the factors were fitted to: "weights" or "activations" (the layer's outputs on calibration images)
    "calibration_images",  # training images the activation fit used
    "calibration_s",  # seconds collecting the calibration activations (part of decompose_s)
    "distill_alpha",  # weight of the knowledge-distillation term in fine-tuning; null: no distillation
    # the end-to-end check right after decomposing: the decomposed model against the original, no labels
    "check_images",  # samples compared (further training images, not the calibration ones)
    "check_held_out",  # false: no held-out inputs, the calibration images were reused
    "check_agreement",  # share of predictions unchanged (top-1 agreement), 0-1
    "check_kl",  # mean KL(original || decomposed) of the predicted distributions, nats
    "check_rel_error",  # ||f'(x) - f(x)|| / ||f(x)|| of the outputs
    "bn_recalibration",  # kept | rejected (re-estimation hurt on the check) | unchecked | off | no BatchNorm
    "decomposition_warning",  # the collapse warning (agreement below rank.min_agreement), else null
    # "calibrated" (trainer.calibrated applied: fit=activations) or "configured" (trainer.finetune_optim as set)
    "finetune_recipe",
    # rank.allocation global / fastest (null when uniform): the summed per-layer damages of the chosen ranks and of
    # the uniform ones (check_kl is the measured total)
    "predicted_damage",
    "uniform_predicted_damage",
]
TARGET_COLUMNS: list[str] = [
    "decompose_s",  # the whole decomposition, calibration included
    "target_drop",  # points of top-1 below the original's the to-target columns measure against
    "finetune_epochs_to_target",  # first fine-tuning epoch within the target (0: already before); null: never
    "finetune_s_to_target",  # wall seconds from fit start to the end of that epoch's validation; null: never
    "time_to_target_s",  # decompose_s + finetune_s_to_target; null when either is missing
]
STATUS_COLUMNS: list[str] = ["status", "error", "duration_s"]

#: The row contract, in order. Extra keys are allowed and kept after these.
RESULT_COLUMNS: list[str] = (IDENTITY_COLUMNS + INPUT_COLUMNS + SIZE_COLUMNS + SPEED_COLUMNS + DEPLOY_COLUMNS
                              + MEMORY_COLUMNS + QUALITY_COLUMNS + TARGET_COLUMNS + STATUS_COLUMNS)

# Block medians of one fixed step that differ by more than this mean the machine changed speed under the
# benchmark (another load, a host burst): the ratios still compare like with like, but less certainly.
UNSTABLE_ROUND_SPREAD = 0.25


STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_RUNNING = "running"

#: Sort order of a sweep table.
SORT_COLUMNS: list[str] = ["model", "rank_policy", "rank_ratio", "freeze", "overrides"]

# derived column -> (numerator, denominator)
_DERIVED_RATIOS: dict[str, tuple[str, str]] = {
    "params_ratio": ("params_original", "params_decomposed"),
    "flops_speedup_infer": ("flops_original", "flops_decomposed"),
    "flops_speedup_train": ("train_flops_original", "train_flops_decomposed"),
    "train_speedup": ("train_ips_decomposed", "train_ips_original"),
    "infer_speedup": ("infer_ips_decomposed", "infer_ips_original"),
    "infer_speedup_deployed": ("infer_ips_deployed", "infer_ips_original"),
}


def finite_number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN, bool, non-numeric)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _ratio(num: Any, den: Any) -> float | None:
    a, b = finite_number(num), finite_number(den)
    if a is None or b is None or b == 0:
        return None
    return a / b


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and other array-likes are present
        return False


def _json_string(value: Any) -> Any:
    """Nested config (dict / list / DictConfig) -> compact JSON string; strings and None pass through."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(jsonable(value), sort_keys=True, default=json_default)
    return value


def make_row(**values: Any) -> dict[str, Any]:
    """Build a complete row: every contract column present (missing -> None), derived ratios filled in.

    Derived columns are computed only when not given: ``params_ratio`` and ``flops_speedup_*`` are
    original/decomposed (>1 = smaller/cheaper), ``train_speedup`` / ``infer_speedup`` are decomposed/original
    images/s (>1 = faster), ``top1_drop`` = original - fine-tuned decomposed top-1 (same unit as the inputs,
    percent points by convention), ``time_to_target_s`` = ``decompose_s`` + ``finetune_s_to_target``.
    ``rank_params`` / ``freeze_params`` given as dicts become JSON strings and ``overrides`` given as a list
    becomes one space-separated string. Extra keys are kept after the contract columns.
    """
    row: dict[str, Any] = {col: None for col in RESULT_COLUMNS}
    for key, value in values.items():
        row[key] = None if (not isinstance(value, (list, tuple, Mapping)) and is_missing(value)) else value

    for key in ("rank_params", "freeze_params"):
        row[key] = _json_string(row[key])
    if isinstance(row["overrides"], (list, tuple)):
        row["overrides"] = " ".join(str(v) for v in row["overrides"])
    for key in ("time",):
        if isinstance(row[key], (_dt.datetime, _dt.date)):
            row[key] = row[key].isoformat()
    if isinstance(row["output_dir"], os.PathLike):
        row["output_dir"] = os.fspath(row["output_dir"])

    for out, (num, den) in _DERIVED_RATIOS.items():
        if row[out] is None:
            row[out] = _ratio(row[num], row[den])
    if row["top1_drop"] is None:
        a, b = finite_number(row["top1_original"]), finite_number(row["top1_decomposed"])
        row["top1_drop"] = None if a is None or b is None else a - b
    if row["time_to_target_s"] is None:
        a, b = finite_number(row["decompose_s"]), finite_number(row["finetune_s_to_target"])
        row["time_to_target_s"] = None if a is None or b is None else a + b
    return row


def is_complete(row: Mapping[str, Any] | None) -> bool:
    """True when the job finished successfully (``status == "ok"``); failed and running rows are not."""
    return bool(row) and row.get("status") == STATUS_OK


def rows_to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Contract columns first (in order), extra keys after in first-seen order, sorted like a sweep table."""
    rows = [make_row(**dict(r)) for r in rows]
    extra: list[str] = []
    for r in rows:
        for k in r:
            if k not in RESULT_COLUMNS and k not in extra:
                extra.append(k)
    df = pd.DataFrame.from_records(rows, columns=RESULT_COLUMNS + extra)
    return sort_rows(df)


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by (model, rank_policy, rank_ratio, freeze, overrides), missing values last, stable."""
    keys = [c for c in SORT_COLUMNS if c in df.columns]
    if not keys or df.empty:
        return df.reset_index(drop=True)
    helper = pd.DataFrame(index=df.index)
    for k in keys:  # sort numbers as numbers and the rest as text, whatever the column's dtype
        num = pd.to_numeric(df[k], errors="coerce")
        if num.notna().sum() == df[k].notna().sum():
            helper[k] = num
        else:
            helper[k] = df[k].map(lambda v: None if is_missing(v) else str(v))
    order = helper.sort_values(keys, na_position="last", kind="stable").index
    return df.loc[order].reset_index(drop=True)


def split_overrides(text: str) -> list[str]:
    """A row's space-joined ``overrides`` back into overrides: spaces inside brackets or quotes do not split."""
    out: list[str] = []
    cur: list[str] = []
    depth, quote = 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(depth - 1, 0)
        elif ch.isspace() and depth == 0:
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


# override keys the Markdown table already shows in a column of their own
COLUMN_OVERRIDES = {"variant", "model", "rank.policy", "rank.ratio", "rank.multiple", "freeze", "freeze.schedule",
                    "device", "device.accelerator"}


def own_overrides(df: pd.DataFrame) -> list[str] | None:
    """Each row's overrides that not every row shares, less those with a column of their own (variant, rank
    policy, ...): a sweep over ``freeze.importance`` or ``trainer.batch_size`` would otherwise give rows that
    look alike. None when no row has one.
    """
    if "overrides" not in df.columns or len(df) < 2:
        return None
    tokens = [split_overrides(o) if isinstance(o, str) else [] for o in df["overrides"]]
    given = [set(t) for t in tokens if t]
    common = set.intersection(*given) if given else set()

    def shown(token: str) -> bool:
        return token not in common and token.split("=", 1)[0].lstrip("+~") not in COLUMN_OVERRIDES

    own = [" ".join(t for t in ts if shown(t)) for ts in tokens]
    return own if any(own) else None
