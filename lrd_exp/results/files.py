"""The names of the files jobs and sweeps write: one place for the writers and for the readers (figures, tables)."""

RESULT_FILENAME = "result.json"  # a job's row (lrd_exp.results.io)
CURVES_FILENAME = "curves.csv"  # a training job's validation curves, per stage and epoch
TIMINGS_FILENAME = "rank_timings.csv"  # every candidate rank the optimized policy timed
TABLE_FILENAME = "results.csv"  # a sweep's rows, every column (lrd_exp.results.tables)
MARKDOWN_FILENAME = "results.md"  # the readable subset of the same table
REPLICATES_FILENAME = "replicates.csv"  # a seed sweep's means and 95 % intervals
