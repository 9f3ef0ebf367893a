"""The end-of-run summary a user reads in the terminal, with the notes on the machine's drift."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lrd_exp.results.row import UNSTABLE_ROUND_SPREAD, finite_number, make_row


def unstable_note(row: Mapping[str, Any]) -> str | None:
    """One line for a run's report when the machine changed speed under its benchmark, else None."""
    spread = finite_number(row.get("bench_round_spread"))
    if spread is None or spread <= UNSTABLE_ROUND_SPREAD:
        return None
    return (f"timings unstable: the original's step moved {spread:.0%} during the benchmark (the machine "
            "changed speed); re-run on an idle machine or raise bench.steps for firmer speedups.")


def drift_fidelity_note(row: Mapping[str, Any]) -> str | None:
    """One line when the loop / benchmark ratio and its time-paired version disagree by more than 10 %: the gap
    is the machine changing speed between fine-tuning and the benchmark, not the framework."""
    apart, paired = finite_number(row.get("train_ips_fidelity")), finite_number(row.get("train_ips_fidelity_paired"))
    if apart is None or paired is None or paired <= 0 or abs(apart / paired - 1) <= 0.10:
        return None
    return (f"loop vs benchmark: {apart:.2f}x against the benchmark after training but {paired:.2f}x paired epoch by "
            "epoch; the difference is the machine's speed changing in between, not the framework.")


def _decomposition_note(row: Mapping[str, Any]) -> str:
    """``fit=activations, 256 calibration images, 1.2 s`` (what of it the row has; empty for an old row)."""
    parts = [f"fit={row['fit']}"] if row.get("fit") else []
    images, calib = finite_number(row.get("calibration_images")), finite_number(row.get("calibration_s"))
    if images is not None and images > 0:
        parts.append(f"{images:.0f} calibration images" + (f", {calib:.1f} s" if calib is not None else ""))
    return ", ".join(parts)


def time_to_target_line(row: Mapping[str, Any]) -> str | None:
    """One line on the time to accuracy, the decomposition's fit and distillation; None for a row without them."""
    drop = finite_number(row.get("target_drop"))
    epochs, ft_s = finite_number(row.get("finetune_epochs_to_target")), finite_number(row.get("finetune_s_to_target"))
    total, dec_s = finite_number(row.get("time_to_target_s")), finite_number(row.get("decompose_s"))
    alpha = finite_number(row.get("distill_alpha"))
    detail = [f"decomposition {dec_s:.1f} s"] if dec_s is not None and total is None else []
    detail += [_decomposition_note(row)] if _decomposition_note(row) else []
    kd = f"distilled from the original (alpha={alpha:g})" if alpha is not None else ""
    if drop is None:  # no fine-tuning target measured: what the row has of the rest
        body = ", ".join(detail + ([kd] if kd else []))
        return body or None
    if epochs is None:
        body = "not reached in fine-tuning"
    elif epochs == 0:
        body = "already within before fine-tuning (0 epochs)"
    else:
        body = f"{epochs:.0f} epoch{'s' if epochs != 1 else ''}"
        body += f", {ft_s:.1f} s fine-tuning" if ft_s is not None else ""
    if total is not None:
        body += f", {total:.1f} s with decomposition"
    line = f"time to within {drop:g} pt of the original's top-1: {body}"
    line += f" ({', '.join(detail)})" if detail else ""
    return line + (f"; {kd}" if kd else "")


def check_line(row: Mapping[str, Any]) -> str | None:
    """The end-to-end check right after decomposing, in one line (and the collapse warning, if any); None without."""
    images, error = finite_number(row.get("check_images")), finite_number(row.get("check_rel_error"))
    if images is None or error is None:
        return None
    agreement, kl = finite_number(row.get("check_agreement")), finite_number(row.get("check_kl"))
    parts = ([f"top-1 agreement {100 * agreement:.1f} %"] if agreement is not None else []) + (
        [f"KL {kl:.3g}"] if kl is not None else []) + [f"output error {error:.3g}"]
    where = "held-out training images" if row.get("check_held_out") else "calibration images (none held out)"
    line = f"right after decomposing, against the original on {images:.0f} {where}: {', '.join(parts)}"
    bn = {"kept": "BatchNorm re-estimation kept (it helped)",
          "rejected": "BatchNorm re-estimation rejected (it hurt; the original statistics kept)"}.get(
        str(row.get("bn_recalibration")))
    line += f"; {bn}" if bn else ""
    warning = row.get("decomposition_warning")
    return line + (f"\nWARNING: {warning}" if warning else "")


def _human(value: Any, unit: str = "") -> str:
    num = finite_number(value)
    if num is None:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(num) >= div:
            return f"{num / div:.2f} {suffix}{unit}".rstrip()
    return f"{num:.4g} {unit}".rstrip()


def _spread(row: Mapping[str, Any], key: str) -> str:
    med = finite_number(row.get(key))
    if med is None:
        return "-"
    lo, hi = finite_number(row.get(f"{key}_min")), finite_number(row.get(f"{key}_max"))
    txt = f"{med:,.1f}"
    if lo is not None and hi is not None:
        txt += f" [{lo:,.1f}-{hi:,.1f}]"
    return txt


def _latency(row: Mapping[str, Any], side: str) -> str:
    med, p90 = finite_number(row.get(f"latency_ms_{side}")), finite_number(row.get(f"latency_ms_{side}_p90"))
    if med is None:
        return "-"
    return f"{med:.2f}" + (f" [{p90:.2f}]" if p90 is not None else "")


def _times(v: Any, suffix: str = "x") -> str:
    """``2.50x`` (a ratio with its suffix), ``-`` when missing."""
    n = finite_number(v)
    return "-" if n is None else f"{n:.2f}{suffix}"


def _pct(v: Any) -> str:
    n = finite_number(v)
    return "-" if n is None else f"{n:.2f}"


def _drop(a: Any, b: Any) -> str:
    na, nb = finite_number(a), finite_number(b)
    return "-" if na is None or nb is None else f"{na - nb:+.2f} pt drop"


def _ratio_with(v: Any, words: str) -> str:
    """``2.50x smaller`` / ``1.22x speedup``, ``-`` when the ratio is missing."""
    return _times(v) + words if v is not None else "-"


def _core_rows(r: Mapping[str, Any]) -> list[list[str]]:
    """The rows every summary has: size, FLOPs, accuracy and the benchmark's throughput."""
    return [
        ["params", _human(r["params_original"]), _human(r["params_decomposed"]),
         _ratio_with(r["params_ratio"], " smaller")],
        ["forward FLOPs / image", _human(r["flops_original"]), _human(r["flops_decomposed"]),
         _times(r["flops_speedup_infer"])],
        ["train FLOPs / step", _human(r["train_flops_original"]), _human(r["train_flops_decomposed"]),
         _times(r["flops_speedup_train"])],
        ["top-1 % (before fine-tune)", _pct(r["top1_original"]), _pct(r["top1_decomposed_pre"]),
         _drop(r["top1_original"], r["top1_decomposed_pre"])],
        ["top-1 % (after fine-tune)", _pct(r["top1_original"]), _pct(r["top1_decomposed"]),
         _drop(r["top1_original"], r["top1_decomposed"])],
        ["train images/s [min-max]", _spread(r, "train_ips_original"), _spread(r, "train_ips_decomposed"),
         _ratio_with(r["train_speedup"], " speedup")],
        ["infer images/s [min-max]", _spread(r, "infer_ips_original"), _spread(r, "infer_ips_decomposed"),
         _ratio_with(r["infer_speedup"], " speedup")],
    ]


def _deployment_rows(r: Mapping[str, Any]) -> list[list[str]]:
    """The deployed (merged) model's throughput and the single-image latencies, when measured."""
    rows = []
    if finite_number(r.get("infer_ips_deployed")) is not None:
        merged = finite_number(r.get("layers_merged"))
        rows.append(["deployed infer images/s", "-", f"{finite_number(r['infer_ips_deployed']):,.1f}",
                     _times(r.get("infer_speedup_deployed")) + " speedup"
                     + (f" ({merged:.0f} layers merged)" if merged is not None else "")])
    if any(finite_number(r.get(f"latency_ms_{s}")) is not None for s in ("original", "decomposed")):
        deployed = finite_number(r.get("latency_ms_deployed"))
        rows.append(["latency ms, 1 image [p90]", _latency(r, "original"), _latency(r, "decomposed"),
                     f"deployed {_latency(r, 'deployed')}" if deployed is not None else "-"])
    return rows


def _training_rows(r: Mapping[str, Any]) -> list[list[str]]:
    """Training memory and the fine-tuning loop's own throughput against the benchmark, when measured."""
    rows = []
    if any(finite_number(r.get(f"train_mem_mb_{s}")) is not None for s in ("original", "decomposed")):
        a, b = finite_number(r.get("train_mem_mb_original")), finite_number(r.get("train_mem_mb_decomposed"))
        rows.append([f"train memory MiB ({r.get('train_mem_kind') or '-'})", "-" if a is None else f"{a:,.1f}",
                     "-" if b is None else f"{b:,.1f}", _times(a / b) + " smaller" if a and b else "-"])
    if finite_number(r.get("train_ips_logged")) is not None:
        rows.append(["fine-tuning loop images/s", "-", f"{finite_number(r['train_ips_logged']):,.1f}",
                     _times(r.get("train_ips_fidelity")) + " of the benchmark"
                     if finite_number(r.get("train_ips_fidelity")) is not None else "-"])
    if finite_number(r.get("train_ips_probe")) is not None:
        rows.append(["benchmark between epochs", "-", f"{finite_number(r['train_ips_probe']):,.1f}",
                     _times(r.get("train_ips_fidelity_paired")) + " loop / benchmark, paired"])
    return rows


def _heading(r: Mapping[str, Any]) -> str:
    """``LRD result (model=..., dataset=..., ...)``: the run's identity, what of it the row has."""
    ident = ", ".join(
        f"{k}={r[k]}"
        for k in ("model", "dataset", "rank_policy", "rank_ratio", "rank_multiple", "freeze", "device_name")
        if r.get(k) is not None
    )
    return f"LRD result ({ident})" if ident else "LRD result"


def _notes(r: Mapping[str, Any]) -> list[str]:
    """The lines under the table: loop overhead, time to target, the machine's drift."""
    overhead = finite_number(r.get("train_loop_overhead"))
    notes = [f"fine-tuning loop: {overhead:.0%} of its wall time was spent between steps (data loading, hooks, "
             "logging)" if overhead is not None else None, check_line(r), time_to_target_line(r),
             drift_fidelity_note(r),
             unstable_note(r)]
    return [n for n in notes if n]


def _status_line(r: Mapping[str, Any]) -> str:
    """``status: ok (12 s)`` or ``status: failed: <error>``."""
    status = r.get("status") or "-"
    if r.get("error"):
        status += f": {r['error']}"
    duration = finite_number(r["duration_s"])
    return f"status: {status}" + (f" ({duration:.0f} s)" if duration is not None else "")


def format_summary(row: Mapping[str, Any]) -> str:
    """End-of-run table, original vs decomposed, so a user reads the outcome without opening result.json."""
    from tabulate import tabulate

    r = make_row(**dict(row))
    table = _core_rows(r) + _deployment_rows(r) + _training_rows(r)
    lines = [
        _heading(r),
        tabulate(table, headers=["", "original", "decomposed", "ratio"], tablefmt="simple",
                 disable_numparse=True, colalign=("left", "right", "right", "left")),
        "ratio: size rows original/decomposed (FLOP-predicted speedup); speed rows decomposed/original.",
        *_notes(r),
        _status_line(r),
    ]
    if r.get("output_dir"):
        lines.append(f"output: {r['output_dir']}")
    return "\n".join(lines)
