"""Hydra sweeps: one table at the end of a multirun (callbacks) and honest timings in parallel sweeps (guard)."""

from lrd_exp.sweep.callbacks import AggregateResults
from lrd_exp.sweep.guard import ParallelThroughputGuard, warn_parallel_throughput

__all__ = ["AggregateResults", "ParallelThroughputGuard", "warn_parallel_throughput"]
