"""Paper figures from sweep tables: throughput vs accuracy, speedup bars, convergence, rank saw-tooth, against
compression, and ``task=advise``'s frontier.

Each plotting function takes a DataFrame and a PNG path, returns the path it wrote, or None (after saying why on
the ``lrd_exp`` logger) when its inputs are missing, so one absent measurement never blocks the other figures.
What is plotted comes from the rows' own columns (``freeze``, ``rank_*``, an advice table's grid keys), never from
a display label read back. Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, any backend, safe
in tests and servers).
"""

from lrd_exp.results.figures.advice import FAMILY_MARKERS, advice_frontier, allocation_family
from lrd_exp.results.figures.common import DPI, FIGSIZE, variant_label
from lrd_exp.results.figures.compression import versus_compression
from lrd_exp.results.figures.convergence import convergence, frozen_variants
from lrd_exp.results.figures.loading import (
    classify_csv,
    job_row,
    label_job_curves,
    load_curves,
    load_results,
    load_timings,
)
from lrd_exp.results.figures.timings import rank_saw_tooth
from lrd_exp.results.figures.variants import speedup_bars, throughput_vs_accuracy

__all__ = [
    "DPI",
    "FAMILY_MARKERS",
    "FIGSIZE",
    "advice_frontier",
    "allocation_family",
    "classify_csv",
    "convergence",
    "frozen_variants",
    "job_row",
    "label_job_curves",
    "load_curves",
    "load_results",
    "load_timings",
    "rank_saw_tooth",
    "speedup_bars",
    "throughput_vs_accuracy",
    "variant_label",
    "versus_compression",
]
