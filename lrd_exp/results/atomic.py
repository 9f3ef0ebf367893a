"""Atomic files: text and strict JSON written so that a killed job never leaves a torn file.

Writes go to a temp file in the same dir, are fsynced and renamed over the target, because a job killed
mid-write must never leave a corrupt row that breaks the aggregation of a long sweep. Standard library only:
the rank search caches its timings with it, and rows, tables and model files (:mod:`lrd_exp.results.io`) build on it.
"""

from __future__ import annotations

import datetime as _dt
import enum
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], mode: str, write: Callable[[Any], None]) -> Path:
    """Write through ``write(file)`` so that readers see either the old file or the whole new one, never a torn
    write: a temp file in the same dir, fsync, ``os.replace``, fsync of the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # mkstemp creates 0600; keep the old file's mode, else a normal 0644
            os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        except OSError:
            pass
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` so that readers see either the old file or the whole new one, never a torn write."""
    return write_atomic(path, "w", lambda fh: fh.write(text))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Serialize ``obj`` as strict JSON (NaN/inf become null; numpy, Path and Enum values converted), atomically."""
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False, default=json_default) + "\n"
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


def json_default(value: Any) -> Any:
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
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "tolist"):
        return jsonable(value.tolist())
    return str(value)


def jsonable(obj: Any) -> Any:
    """Recursively replace non-finite floats by None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            return obj
    return obj
