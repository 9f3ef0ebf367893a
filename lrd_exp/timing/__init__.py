"""How speed is measured: a prepared training / inference step with synchronised timing (steps), FLOPs with
freezing (flops), one training step's memory (memory), and what the training loop itself achieved (loop). The
side-by-side comparison of the original and the decomposed model is the measure stage of a job:
:mod:`lrd_exp.tasks.measure`. The names load on first use: the rank search times layers without Lightning."""

from lrd_exp.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lrd_exp.timing.flops": ["count_flops", "count_params"],
    "lrd_exp.timing.loop": ["BenchProbe", "StepThroughput"],
    "lrd_exp.timing.steps": ["Timing", "prepare_inference", "prepare_train_step", "time_fn"],
})
