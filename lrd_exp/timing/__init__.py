"""How speed is measured: a prepared training / inference step with synchronised timing (steps), one layer timed
alone (layer: the rank search's candidates, deployment's two forms of a layer), FLOPs with freezing (flops), one
training step's memory (memory), the original and the decomposed model timed side by side, interleaved, in every
training state (compare), and what the training loop itself achieved (loop). The names load
on first use: the rank search times layers without Lightning."""

from lrd_exp.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lrd_exp.timing.compare": ["CompareSettings", "Comparison", "Measured", "compare", "round_spread"],
    "lrd_exp.timing.flops": ["count_flops", "count_params"],
    "lrd_exp.timing.loop": ["BenchProbe", "StepThroughput"],
    "lrd_exp.timing.steps": ["Timing", "prepare_inference", "prepare_train_step", "time_fn"],
})
