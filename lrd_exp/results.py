"""Result rows, sweep aggregation, tables and the W&B Table.

Every job writes one flat ``result.json`` (the row contract, :data:`RESULT_COLUMNS`) in its Hydra output
dir; a sweep collects those rows into ``results.csv`` / ``results.md`` and one W&B Table. Rows are flat dicts
so that CSV, Markdown, pandas and W&B all see the same columns; nested config goes in JSON-string columns.

Writes are atomic (temp file in the same dir, fsync, ``os.replace``) because a job killed mid-write must
never leave a corrupt row that breaks the aggregation of a long sweep.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

RESULT_FILENAME = "result.json"

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
QUALITY_COLUMNS: list[str] = [
    "top1_original",
    "top1_decomposed_pre",  # before fine-tuning
    "top1_decomposed",  # after fine-tuning
    "top1_drop",  # original - decomposed (after fine-tune), in points
]
STATUS_COLUMNS: list[str] = ["status", "error", "duration_s"]

#: The row contract, in order. Extra keys are allowed and kept after these.
RESULT_COLUMNS: list[str] = IDENTITY_COLUMNS + SIZE_COLUMNS + SPEED_COLUMNS + QUALITY_COLUMNS + STATUS_COLUMNS

# Block medians of one fixed step that differ by more than this mean the machine changed speed under the
# benchmark (another load, a host burst): the ratios still compare like with like, but less certainly.
UNSTABLE_ROUND_SPREAD = 0.25


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
}


# --------------------------------------------------------------------------------------------- atomic I/O


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` so that readers see either the old file or the whole new one, never a torn write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # mkstemp creates 0600; keep the old file's mode, else a normal 0644
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
            os.chmod(tmp, mode)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Serialize ``obj`` as strict JSON (NaN/inf become null; numpy, Path and Enum values converted), atomically."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False, default=_json_default) + "\n"
    return write_text_atomic(path, text)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); best effort elsewhere."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "item"):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return str(value)


def _jsonable(obj: Any) -> Any:
    """Recursively replace non-finite floats by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return _jsonable(obj.item())
        except (TypeError, ValueError):
            return obj
    return obj


# ------------------------------------------------------------------------------------------------ rows


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


def _is_missing(value: Any) -> bool:
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
    try:  # OmegaConf containers without importing omegaconf at module import
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(_jsonable(value), sort_keys=True, default=_json_default)
    return value


def make_row(**values: Any) -> dict[str, Any]:
    """Build a complete row: every contract column present (missing -> None), derived ratios filled in.

    Derived columns are computed only when not given: ``params_ratio`` and ``flops_speedup_*`` are
    original/decomposed (>1 = smaller/cheaper), ``train_speedup`` / ``infer_speedup`` are decomposed/original
    images/s (>1 = faster), ``top1_drop`` = original - fine-tuned decomposed top-1 (same unit as the inputs,
    percent points by convention). ``rank_params`` / ``freeze_params`` given as dicts become JSON strings and
    ``overrides`` given as a list becomes one space-separated string. Extra keys are kept after the contract
    columns.
    """
    row: dict[str, Any] = {col: None for col in RESULT_COLUMNS}
    for key, value in values.items():
        row[key] = None if (not isinstance(value, (list, tuple, Mapping)) and _is_missing(value)) else value

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
    return row


def write_result(output_dir: str | os.PathLike[str], row: Mapping[str, Any]) -> Path:
    """Normalise ``row`` with :func:`make_row` and write ``<output_dir>/result.json`` atomically."""
    return write_json_atomic(Path(output_dir) / RESULT_FILENAME, make_row(**dict(row)))


def read_result(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The row stored at ``path``, or None when it is missing, unreadable, corrupt or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(row: Mapping[str, Any] | None) -> bool:
    """True when the job finished successfully (``status == "ok"``); failed and running rows are not."""
    return bool(row) and row.get("status") == STATUS_OK


# --------------------------------------------------------------------------------------------- sweep


def find_result_files(sweep_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``result.json`` below ``sweep_dir`` (any depth, symlinked dirs not followed), sorted."""
    found: list[Path] = []
    for root, dirs, files in os.walk(sweep_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d != "wandb")  # W&B run dirs never hold rows
        if RESULT_FILENAME in files:
            found.append(Path(root) / RESULT_FILENAME)
    return sorted(found)


def _job_key(row: Mapping[str, Any], path: Path) -> str:
    """One key per job dir: the row's own ``output_dir`` when it has one (copies of a job dir then collapse),
    else the real path of the folder that holds the file."""
    out = row.get("output_dir")
    base = Path(out) if isinstance(out, str) and out else path.parent
    try:
        return str(base.resolve())
    except OSError:
        return str(base.absolute())


def _preference(row: Mapping[str, Any], path: Path) -> tuple:
    """Among duplicates keep a complete row, then the copy that sits in its own output_dir, then the newest."""
    out = row.get("output_dir")
    at_home = False
    if isinstance(out, str) and out:
        try:
            at_home = Path(out).resolve() == path.parent.resolve()
        except OSError:
            at_home = False
    return (is_complete(row), at_home, str(row.get("time") or ""))


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
            helper[k] = df[k].map(lambda v: None if _is_missing(v) else str(v))
    order = helper.sort_values(keys, na_position="last", kind="stable").index
    return df.loc[order].reset_index(drop=True)


def collect_rows(sweep_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """One row per job dir for every ``result.json`` below ``sweep_dir``; corrupt files skipped with a warning.

    The same job dir found twice (a copied or nested duplicate, or a symlink) yields one row. Rows are
    completed with :func:`make_row` (older rows gain new columns as None) and sorted by
    :data:`SORT_COLUMNS`. An empty sweep gives an empty frame with the contract columns.
    """
    chosen: dict[str, tuple[tuple, dict[str, Any]]] = {}
    for path in find_result_files(sweep_dir):
        row = read_result(path)
        if row is None:
            warnings.warn(f"skipping unreadable or corrupt result file: {path}", stacklevel=2)
            continue
        if not row.get("output_dir"):
            row["output_dir"] = str(path.parent)
        key = _job_key(row, path)
        pref = _preference(row, path)
        if key not in chosen or pref > chosen[key][0]:
            chosen[key] = (pref, row)
    return rows_to_frame(row for _, row in chosen.values())


# -------------------------------------------------------------------------------------------- tables

# (column, header, kind) of the readable Markdown subset
MARKDOWN_COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "text"),
    ("variant", "variant", "text"),
    ("rank_policy", "rank policy", "text"),
    ("rank_ratio", "ratio", "g"),
    ("rank_multiple", "multiple", "int"),
    ("freeze", "freeze", "text"),
    ("device", "device", "text"),
    ("params_ratio", "params ratio", "x"),
    ("train_ips_original", "train ips orig", "ips"),
    ("train_ips_decomposed", "train ips dec", "ips"),
    ("train_speedup", "train speedup", "x"),
    ("infer_ips_original", "infer ips orig", "ips"),
    ("infer_ips_decomposed", "infer ips dec", "ips"),
    ("infer_speedup", "infer speedup", "x"),
    ("flops_speedup_train", "FLOP-pred train", "x"),
    ("flops_speedup_infer", "FLOP-pred infer", "x"),
    ("train_ips_fidelity", "loop / bench", "x"),
    ("train_ips_fidelity_paired", "loop / probe", "x"),
    ("bench_round_spread", "drift", "share"),
    ("top1_original", "top-1 orig", "pct"),
    ("top1_decomposed", "top-1 dec", "pct"),
    ("top1_drop", "top-1 drop", "drop"),
    ("status", "status", "status"),
]

MARKDOWN_LEGEND = (
    "_Legend: ips = images/s (median of timed steps); speedup = decomposed / original images/s (>1 = faster); "
    "FLOP-pred = FLOP-predicted speedup (original / decomposed FLOPs); params ratio = original / decomposed; "
    "loop / bench = images/s of the real fine-tuning loop / benchmark images/s (1.00 = no hidden bottleneck); "
    "loop / probe = the same, against the benchmark step timed around each of the loop's epochs (paired in "
    "time, so the machine's drift cancels); "
    "drift = how much the original's training step moved during the benchmark (max-min of the medians of "
    f"consecutive blocks of steps / their median: the machine's own drift; above {UNSTABLE_ROUND_SPREAD:.0%} the speedups are less certain); "
    "top-1 in %, drop = original - fine-tuned decomposed (points); overrides (when shown) = the job's own "
    "command-line overrides, those not every row shares; '-' = not measured._"
)


def _fmt(value: Any, kind: str, row: Mapping[str, Any] | None = None) -> str:
    if kind == "status":
        if _is_missing(value):
            return "-"
        err = None if row is None else row.get("error")
        if value != STATUS_OK and isinstance(err, str) and err:
            short = " ".join(err.split())[:40]
            return f"{value}: {short}"
        return str(value)
    if kind == "text":
        return "-" if _is_missing(value) else str(value)
    num = finite_number(value)
    if num is None:
        return "-" if _is_missing(value) else str(value)
    if kind == "int":
        return f"{int(round(num))}"
    if kind == "g":
        return f"{num:.4g}"
    if kind == "x":
        return f"{num:.2f}"
    if kind == "ips":
        return f"{num:,.0f}" if abs(num) >= 100 else f"{num:.1f}"
    if kind == "pct":
        return f"{num:.2f}"
    if kind == "share":
        return f"{num:.0%}"
    if kind == "drop":
        return f"{num:+.2f}"
    return f"{num:.4g}"


def _unique_text(series: pd.Series | None) -> list[str]:
    if series is None:
        return []
    out: list[str] = []
    for v in series.tolist():
        if not _is_missing(v) and str(v) not in out:
            out.append(str(v))
    return out


def provenance_line(df: pd.DataFrame) -> str:
    """Device names, run dates and git commits of the rows: every committed table says where it came from."""
    devices = _unique_text(df.get("device_name")) or _unique_text(df.get("device")) or ["unknown"]
    dates = sorted({t[:10] for t in _unique_text(df.get("time"))})
    date_txt = (dates[0] if len(dates) == 1 else f"{dates[0]} .. {dates[-1]}") if dates else "unknown"
    commits = [c[:10] for c in _unique_text(df.get("git_commit"))] or ["unknown"]
    status = df["status"] if "status" in df.columns else pd.Series(dtype=object)
    n_ok = int((status == STATUS_OK).sum())
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"_Provenance: device(s): {', '.join(devices)}; run date(s): {date_txt}; "
        f"git commit(s): {', '.join(commits)}; rows: {len(df)} ({n_ok} ok); generated {now}._"
    )


# override keys the Markdown table already shows in a column of their own
COLUMN_OVERRIDES = {"variant", "model", "rank.policy", "rank.ratio", "rank.multiple", "freeze", "freeze.schedule",
                    "device", "device.accelerator"}


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


def markdown_table(df: pd.DataFrame) -> str:
    """The readable subset of a sweep table as GitHub Markdown (numbers rounded, missing shown as '-')."""
    cols = [(c, h, k) for c, h, k in MARKDOWN_COLUMNS if c in df.columns]
    own = own_overrides(df)
    if own is not None:
        df = df.assign(_own_overrides=[o or None for o in own])
        at = next((i + 1 for i, (c, _, _) in enumerate(cols) if c == "variant"), 0)
        cols.insert(at, ("_own_overrides", "overrides", "text"))
    records = df.to_dict("records")
    body = pd.DataFrame(
        [[_fmt(r.get(c), k, r) for c, _, k in cols] for r in records],
        columns=[h for _, h, _ in cols],
    )
    align = ["left" if k in ("text", "status") else "right" for _, _, k in cols]
    body = body.map(lambda v: v.replace("|", "\\|"))  # a '|' in a cell (error text) would split the column
    return body.to_markdown(index=False, disable_numparse=True, colalign=align)


def write_tables(df: pd.DataFrame, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``results.csv`` (every column) and ``results.md`` (readable subset + provenance) atomically."""
    out_dir = Path(out_dir)
    csv_path = write_text_atomic(out_dir / "results.csv", df.to_csv(index=False))
    md = "\n\n".join(
        [
            f"# Results: {out_dir.resolve().name}",
            provenance_line(df),
            markdown_table(df),
            MARKDOWN_LEGEND,
        ]
    )
    md_path = write_text_atomic(out_dir / "results.md", md + "\n")
    return csv_path, md_path


# ------------------------------------------------------------------------------------------- summary


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


def format_summary(row: Mapping[str, Any]) -> str:
    """End-of-run table, original vs decomposed, so a user reads the outcome without opening result.json."""
    from tabulate import tabulate

    r = make_row(**dict(row))

    def x(v: Any, suffix: str = "x") -> str:
        n = finite_number(v)
        return "-" if n is None else f"{n:.2f}{suffix}"

    def pct(v: Any) -> str:
        n = finite_number(v)
        return "-" if n is None else f"{n:.2f}"

    def drop(a: Any, b: Any) -> str:
        na, nb = finite_number(a), finite_number(b)
        return "-" if na is None or nb is None else f"{na - nb:+.2f} pt drop"

    table = [
        ["params", _human(r["params_original"]), _human(r["params_decomposed"]), x(r["params_ratio"]) + " smaller"
         if r["params_ratio"] is not None else "-"],
        ["forward FLOPs / image", _human(r["flops_original"]), _human(r["flops_decomposed"]),
         x(r["flops_speedup_infer"])],
        ["train FLOPs / step", _human(r["train_flops_original"]), _human(r["train_flops_decomposed"]),
         x(r["flops_speedup_train"])],
        ["top-1 % (before fine-tune)", pct(r["top1_original"]), pct(r["top1_decomposed_pre"]),
         drop(r["top1_original"], r["top1_decomposed_pre"])],
        ["top-1 % (after fine-tune)", pct(r["top1_original"]), pct(r["top1_decomposed"]),
         drop(r["top1_original"], r["top1_decomposed"])],
        ["train images/s [min-max]", _spread(r, "train_ips_original"), _spread(r, "train_ips_decomposed"),
         x(r["train_speedup"]) + " speedup" if r["train_speedup"] is not None else "-"],
        ["infer images/s [min-max]", _spread(r, "infer_ips_original"), _spread(r, "infer_ips_decomposed"),
         x(r["infer_speedup"]) + " speedup" if r["infer_speedup"] is not None else "-"],
    ]
    if finite_number(r.get("train_ips_logged")) is not None:
        table.append(["fine-tuning loop images/s", "-", f"{finite_number(r['train_ips_logged']):,.1f}",
                      x(r.get("train_ips_fidelity")) + " of the benchmark"
                      if finite_number(r.get("train_ips_fidelity")) is not None else "-"])
    if finite_number(r.get("train_ips_probe")) is not None:
        table.append(["benchmark between epochs", "-", f"{finite_number(r['train_ips_probe']):,.1f}",
                      x(r.get("train_ips_fidelity_paired")) + " loop / benchmark, paired"])
    ident = ", ".join(
        f"{k}={r[k]}"
        for k in ("model", "dataset", "rank_policy", "rank_ratio", "rank_multiple", "freeze", "device_name")
        if r.get(k) is not None
    )
    head = f"LRD result ({ident})" if ident else "LRD result"
    status = r.get("status") or "-"
    if r.get("error"):
        status += f": {r['error']}"
    overhead = finite_number(r.get("train_loop_overhead"))
    notes = [f"fine-tuning loop: {overhead:.0%} of its wall time was spent between steps (data loading, hooks, "
             "logging)" if overhead is not None else None, drift_fidelity_note(r), unstable_note(r)]
    lines = [
        head,
        tabulate(table, headers=["", "original", "decomposed", "ratio"], tablefmt="simple",
                 disable_numparse=True, colalign=("left", "right", "right", "left")),
        "ratio: size rows original/decomposed (FLOP-predicted speedup); speed rows decomposed/original.",
        *(n for n in notes if n),
        f"status: {status}" + (f" ({finite_number(r['duration_s']):.0f} s)" if finite_number(r["duration_s"]) is not None else ""),
    ]
    if r.get("output_dir"):
        lines.append(f"output: {r['output_dir']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- W&B


def _wandb_value(value: Any) -> Any:
    if _is_missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return value


def log_wandb_table(
    df: pd.DataFrame,
    *,
    project: str,
    group: str,
    mode: str = "offline",
    dir: str | os.PathLike[str] | None = None,
    name: str | None = None,
    entity: str | None = None,
    tags: list[str] | None = None,
) -> str | None:
    """Log the sweep table as one W&B run (Table ``results`` + a throughput-vs-accuracy scatter).

    One run per sweep (``group`` = sweep id) keeps the comparison in one place. Offline by default; the
    table JSON lands under ``<dir>/wandb/offline-run-*/files/media/table/results_*.table.json`` (see
    :func:`find_wandb_table_files`). Returns the run's directory, or None when ``mode == "disabled"`` or there
    are no rows. The run is always finished, so a failure here cannot leak into a later run.
    """
    if mode == "disabled" or df is None or df.empty:
        return None
    import wandb

    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
    columns = [str(c) for c in df.columns]
    data = [[_wandb_value(v) for v in rec] for rec in df.itertuples(index=False, name=None)]

    run = None
    try:
        run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name or f"aggregate-{group}",
            job_type="aggregate",
            tags=tags,
            dir=None if dir is None else str(dir),
            mode=mode,
            reinit="create_new",
            config={"n_rows": len(df), "sweep": group},
            settings=wandb.Settings(
                silent=True,
                console="off",
                x_disable_stats=True,
                x_disable_machine_info=True,
                disable_git=True,
                disable_code=True,
                init_timeout=60,
            ),
        )
        table = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
        payload: dict[str, Any] = {"results": table}
        y = "top1_decomposed"
        for x in ("train_speedup", "train_ips_decomposed"):
            if x in df.columns and y in df.columns and (df[x].notna() & df[y].notna()).any():
                payload["throughput_vs_accuracy"] = wandb.plot.scatter(
                    table, x, y, title=f"{x} vs {y} ({group})"
                )
                break
        run.log(payload)
        run_dir = str(getattr(run.settings, "sync_dir", None) or Path(run.dir).parent)
    finally:
        if run is not None:
            run.finish()
        else:
            wandb.finish()
    return run_dir


def find_wandb_table_files(dir: str | os.PathLike[str], key: str = "results") -> list[Path]:
    """The W&B Table JSON files (``{"columns": [...], "data": [[...]]}``) logged under ``key`` below ``dir``.

    ``dir`` may be the ``dir`` given to :func:`log_wandb_table`, its ``wandb/`` folder or a run dir. The
    ``latest-run`` symlink is skipped so each file appears once; oldest first.
    """
    base = Path(dir)
    if not base.exists():
        return []
    seen: set[Path] = set()
    out: list[Path] = []
    for p in base.rglob(f"{key}_*.table.json"):
        if "latest-run" in p.parts or "table" not in p.parent.name:
            continue
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            out.append(p)
    return sorted(out, key=lambda p: (p.stat().st_mtime, str(p)))
