"""How speed is measured: a prepared training / inference step with synchronised timing (steps), FLOPs with
freezing (flops), the memory of one training step (memory), the original and the decomposed model timed side by
side, interleaved, every training state (compare), and what the training loop itself achieved (loop)."""

from lrd_exp.timing.compare import CompareSettings, Comparison, Measured, compare, round_spread
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

__all__ = ["BenchProbe", "CompareSettings", "Comparison", "Measured", "StepThroughput", "Timing", "compare",
           "count_flops", "count_params", "measure_inference", "measure_train_step", "prepare_inference",
           "prepare_train_step", "round_spread", "time_fn"]
