"""``rank_timings.csv``: one row per candidate a rank search timed (``paper_figures`` plots them). The search
itself writes nothing; the decomposition writes its rows into the job's output folder."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lrd_exp.results.atomic import write_text_atomic
from lrd_exp.results.files import TIMINGS_FILENAME


def timing_rows(layer: str, times: dict[tuple[int, ...] | None, float], estimate: tuple[int, ...],
                choice: tuple[int, ...] | None, *, objective: str, device_name: str) -> list[dict[str, Any]]:
    """One layer's rows: each timed option (rank -1: the original) in ms, and whether it is the choice or the
    estimate."""
    return [{"layer": layer, "rank": -1 if ranks is None else ranks[0],
             "rank_out": -1 if ranks is None else ranks[-1], "time_ms": t * 1e3, "objective": objective,
             "device_name": device_name, "chosen": ranks == choice, "estimate": ranks == estimate}
            for ranks, t in times.items()]


def write_timings(output_dir: str, rows: list[dict[str, Any]]) -> None:
    """``<output_dir>/rank_timings.csv``: every timed candidate of a search (``paper_figures`` plots them)."""
    if not rows:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(os.path.join(output_dir, TIMINGS_FILENAME), text.getvalue())
