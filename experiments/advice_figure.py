"""The frontier figure of a ``task=advise`` table, redrawn from its ``advice.csv`` (no re-measuring).

    python experiments/advice_figure.py results/advise_cpu/advice.csv results/advise_cpu/advice_frontier.png

The device in the title is the table's ``device_name``, or the ``- device:`` line of a PROVENANCE.md beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from lrd_exp.results.figures import advice_frontier


def device_of(table: pd.DataFrame, csv: Path) -> str | None:
    if "device_name" in table and table["device_name"].notna().any():
        return str(table["device_name"].dropna().iloc[0])
    provenance = csv.with_name("PROVENANCE.md")
    lines = provenance.read_text().splitlines() if provenance.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("- device:")), None)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    csv, png = Path(argv[0]), Path(argv[1])
    table = pd.read_csv(csv)
    speed = "train_speedup" if table["train_speedup"].notna().any() else "infer_speedup_deployed"
    return 0 if advice_frontier(table.assign(device_name=device_of(table, csv)), png, speed=speed) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
