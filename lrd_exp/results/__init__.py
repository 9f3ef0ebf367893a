"""Results: atomic files (atomic), the row contract (row), a job's and a sweep's rows on disk (io), sweep tables
(tables), the end-of-run summary (summary), the W&B Table (wandb), replicate statistics (replicates), the Pareto
frontier (pareto) and the paper figures (figures: matplotlib).

Imports nothing else of the package, so every other module may use it; the names load on first use (the rank
search writes its cache through ``atomic`` without pandas).
"""

from lrd_exp.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lrd_exp.results.atomic": ["write_json_atomic", "write_text_atomic"],
    "lrd_exp.results.io": ["collect_rows", "find_result_files", "read_result", "write_result"],
    "lrd_exp.results.row": ["RESULT_COLUMNS", "RESULT_FILENAME", "STATUS_FAILED", "STATUS_OK", "finite_number",
                            "is_complete", "is_missing", "make_row", "own_overrides", "rows_to_frame", "sort_rows",
                            "split_overrides"],
    "lrd_exp.results.summary": ["drift_fidelity_note", "format_summary", "unstable_note"],
    "lrd_exp.results.tables": ["markdown_table", "provenance_line", "write_tables"],
    "lrd_exp.results.wandb": ["find_wandb_table_files", "log_wandb_table"],
})
