"""How speed is measured: a prepared training / inference step with synchronised timing (steps), FLOPs with
freezing (flops), and what the training loop itself achieved (loop). The side-by-side comparison of the original
and the decomposed model is the measure stage of a job: :mod:`lrd_exp.tasks.measure`."""

from lrd_exp.timing.flops import count_flops, count_params
from lrd_exp.timing.loop import BenchProbe, StepThroughput
from lrd_exp.timing.steps import (
           Timing,
           measure_inference,
           measure_train_step,
           prepare_inference,
           prepare_train_step,
           time_fn,
)

__all__ = ["BenchProbe", "StepThroughput", "Timing", "count_flops", "count_params", "measure_inference",
           "measure_train_step", "prepare_inference", "prepare_train_step", "time_fn"]
