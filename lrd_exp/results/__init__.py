"""Results: the row contract (row), atomic files (io), sweep tables (tables), the end-of-run summary (summary),
the W&B Table (wandb) and the paper figures (``lrd_exp.results.figures``, imported on its own: matplotlib).

Imports nothing else of the package, so every other module may use it.
"""

from lrd_exp.results.io import (
    collect_rows,
    find_result_files,
    read_result,
    write_json_atomic,
    write_result,
    write_text_atomic,
)
from lrd_exp.results.row import (
    RESULT_COLUMNS,
    RESULT_FILENAME,
    STATUS_FAILED,
    STATUS_OK,
    finite_number,
    is_complete,
    is_missing,
    make_row,
    own_overrides,
    rows_to_frame,
    sort_rows,
    split_overrides,
)
from lrd_exp.results.summary import drift_fidelity_note, format_summary, unstable_note
from lrd_exp.results.tables import markdown_table, provenance_line, write_tables
from lrd_exp.results.wandb import find_wandb_table_files, log_wandb_table

__all__ = [
    "RESULT_COLUMNS", "RESULT_FILENAME", "STATUS_FAILED", "STATUS_OK", "collect_rows", "drift_fidelity_note",
    "find_result_files", "find_wandb_table_files", "finite_number", "format_summary", "is_complete", "is_missing",
    "log_wandb_table", "make_row", "markdown_table", "own_overrides", "provenance_line", "read_result",
    "rows_to_frame", "sort_rows", "split_overrides", "unstable_note", "write_json_atomic", "write_result",
    "write_tables", "write_text_atomic",
]
