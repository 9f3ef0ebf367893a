"""DDP + sequential freezing diagnostics: the step time of each way to run DDP while factors freeze (2 CPU ranks, gloo).

Moved out of the package (it was ``python -m lrd_exp.distributed bench``); the results are in ``docs/scaling.md``.

    python experiments/ddp_freeze_bench.py [--steps 100 --repeat 3 --out bench.json] [--help]

Variants (``--variants``, comma-separated):

- ``plain_nofreeze`` / ``rewrap_nofreeze``: Lightning's ``DDPStrategy`` / :class:`FreezeAwareDDPStrategy`, no
  freezing (the cost of the re-wrap check alone);
- ``rewrap``: :class:`FreezeAwareDDPStrategy` with sequential freezing (what ``device.strategy=ddp`` runs);
- ``find_unused``: ``DDPStrategy(find_unused_parameters=True)`` with sequential freezing;
- ``grad_mask``: frozen factors keep ``requires_grad`` and their gradients are dropped (:class:`GradMaskFreezing`);
- ``plain_freeze``: plain ``DDPStrategy`` with sequential freezing (expected to fail at the first freeze stage).

Per variant it prints one JSON row: median wall / CPU time per step before freezing and in the final freeze state,
the re-wraps, and whether the frozen factors stayed unchanged and all ranks hold the same weights
(:class:`ReplicaStateDump`, :func:`compare_replicas`). Set ``LRD_DEBUG=1`` for a variant's full traceback.

The DDP workers are started with ``spawn`` and unpickle the callbacks defined here by module name, so this file
must be importable as ``ddp_freeze_bench``: ``__main__`` puts this folder on ``sys.path`` and runs that module's
:func:`bench_main`, not its own copy.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lrd_exp.decompose import decompose_model
from lrd_exp.distributed.ddp import FreezeAwareDDPStrategy
from lrd_exp.freezing.callback import FreezingCallback
from lrd_exp.training.classifier import Classifier


# ============================================================================================ diagnostics
class StepTimer(pl.Callback):
    """Wall time of every training step (batch start -> batch end, optimizer step included), rank 0 only.

    Put it first in the callback list so that the freezing decision of a stage change is inside the step.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.n_trainable: list[int] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu_times.append(time.process_time() - self._c0)  # this rank's CPU time: robust to a busy machine
        self.n_trainable.append(sum(p.requires_grad for p in pl_module.parameters()))


class ReplicaStateDump(pl.Callback):
    """Saves, per rank, each parameter's value when it got frozen and every parameter at the end of fit.

    Frozen: ``requires_grad`` off, or in a :class:`FreezingCallback`'s frozen set. ``<dir>/rank<r>.pt`` holds
    ``{"rank", "frozen_at": {name: (step, tensor)}, "final": {name: tensor}, "rewraps": [...], "step_times": [...]}``;
    :func:`compare_replicas` checks a set of them. Place it after the freezing callback: a factor's value is taken
    right after it was frozen, before the next update.
    """

    def __init__(self, directory: str, timer: StepTimer | None = None) -> None:
        self.directory = directory
        self.timer = timer
        self.frozen_at: dict[str, tuple[int, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        scheduled = {id(p) for cb in trainer.callbacks if isinstance(cb, FreezingCallback) and cb.schedule
                     for f in cb.frozen for p in f.parameters(cb.schedule.freeze_bias)}
        for name, p in pl_module.named_parameters():
            frozen = not p.requires_grad or id(p) in scheduled
            if frozen and name not in self.frozen_at:
                self.frozen_at[name] = (trainer.global_step, p.detach().cpu().clone())
            elif not frozen and name in self.frozen_at:  # unfrozen again (alternating)
                del self.frozen_at[name]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.directory, exist_ok=True)
        state = {
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "frozen_at": self.frozen_at,
            "final": {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters()},
            "rewraps": list(getattr(trainer.strategy, "rewraps", [])),
            "step_times": list(self.timer.times) if self.timer else [],
            "step_cpu_times": list(self.timer.cpu_times) if self.timer else [],
            "n_trainable": list(self.timer.n_trainable) if self.timer else [],
        }
        torch.save(state, os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


def compare_replicas(paths: Sequence[str]) -> dict[str, Any]:
    """Check per-rank dumps: frozen factors unchanged since they were frozen, every parameter equal on all ranks.

    Returns ``{"ranks", "frozen", "frozen_changed": [names], "mismatched": [names]}`` (bitwise comparisons).
    """
    dumps = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    ref = dumps[0]
    frozen_changed = sorted({n for d in dumps for n, (_, v) in d["frozen_at"].items()
                             if not torch.equal(v, d["final"][n])})
    mismatched = sorted(n for n in ref["final"] if any(not torch.equal(ref["final"][n], d["final"][n])
                                                       for d in dumps[1:]))
    frozen_sets = [sorted(d["frozen_at"]) for d in dumps]
    return {"ranks": [d["rank"] for d in dumps], "frozen": frozen_sets[0],
            "same_frozen_sets": all(s == frozen_sets[0] for s in frozen_sets),
            "frozen_changed": frozen_changed, "mismatched": mismatched}


# ============================================================================================ measurement
def _bench_worker_fit(variant: str, args: Any, out_dir: str) -> None:
    """One variant of the DDP + freezing comparison: a 2-process CPU fit, step times and replica dumps."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, in_chans=3)
    x = torch.randn(args.batch_size * args.devices * (args.steps + 1), 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (x.shape[0],))
    decompose_model(model, policy="quantized", ratio=2.0, multiple=8, example_input=x[:1])
    freeze = {"schedule": "sequential", "unit": "step", "warmup": args.warmup, "period": args.period,
              "per_stage": args.per_stage, "final_fraction": args.final_fraction, "importance": "weight_change"}
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if variant == "plain_nofreeze":
        strategy: Any = DDPStrategy(start_method="spawn", cluster_environment=LightningEnvironment())
    elif variant == "rewrap_nofreeze":
        strategy = FreezeAwareDDPStrategy(start_method="spawn", cluster_environment=LightningEnvironment())
    elif variant == "find_unused":
        strategy = DDPStrategy(start_method="spawn", find_unused_parameters=True,
                               cluster_environment=LightningEnvironment())
        callbacks.append(FreezingCallback(freeze, log_flops=False))
    elif variant == "grad_mask":
        strategy = DDPStrategy(start_method="spawn", cluster_environment=LightningEnvironment())
        callbacks.append(GradMaskFreezing(freeze, log_flops=False))
    elif variant in ("rewrap", "plain_freeze"):
        cls = FreezeAwareDDPStrategy if variant == "rewrap" else DDPStrategy
        strategy = cls(start_method="spawn", cluster_environment=LightningEnvironment())
        callbacks.append(FreezingCallback(freeze, log_flops=False))
    else:
        raise ValueError(f"unknown variant {variant!r}")
    callbacks.append(ReplicaStateDump(os.path.join(out_dir, variant), timer=timer))
    module = Classifier(copy.deepcopy(model), 10, optim={"name": "sgd", "lr": 0.01, "scheduler": "none"})
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=callbacks)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)


class GradMaskFreezing(FreezingCallback):
    """Option (c), for the comparison only: frozen factors keep ``requires_grad`` (DDP sees no change) and their
    gradient is dropped before the optimizer step: they are not updated, but their gradients are still computed
    and all-reduced (what sequential freezing is meant to save)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        for f in self.schedule.factors:
            for p in f.parameters(True):
                p.requires_grad_(True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        for f in self.frozen:
            for p in f.parameters(self.schedule.freeze_bias):
                p.grad = None


def _summarize(variant: str, dump_dir: str, args: Any) -> dict[str, Any]:
    """Median wall and CPU time per step before freezing (steps 2..warmup) and in the final freeze state."""
    paths = sorted(os.path.join(dump_dir, f) for f in os.listdir(dump_dir) if f.endswith(".pt"))
    dumps = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    rank0 = dumps[0]
    final_start = args.warmup + args.period * (math.ceil(args.final_fraction / args.per_stage - 1e-9) - 1) + 2
    phases = {"before_freezing": slice(2, args.warmup), "final_state": slice(final_start, None)}

    def med(values: list[float]) -> float | None:
        return round(statistics.median(values), 4) if values else None

    row: dict[str, Any] = {"variant": variant, "steps": len(rank0["step_times"])}
    for name, sl in phases.items():
        row[f"wall_s_{name}"] = med(rank0["step_times"][sl])  # ranks step in lock-step: rank 0 is enough
        cpu = [med(d["step_cpu_times"][sl]) for d in dumps]
        row[f"cpu_s_{name}"] = round(statistics.mean(cpu), 4) if all(c is not None for c in cpu) else None
    cmp = compare_replicas(paths)
    row.update(
        max_step_s=round(max(rank0["step_times"]), 4),
        trainable_tensors_final=rank0["n_trainable"][-1] if rank0["n_trainable"] else None,
        rewraps=[(r["step"], r["trainable_tensors"], r["seconds"]) for r in rank0["rewraps"]],
        frozen_factor_tensors=len(cmp["frozen"]),
        frozen_unchanged=not cmp["frozen_changed"], ranks_in_sync=not cmp["mismatched"],
    )
    return row


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``python experiments/ddp_freeze_bench.py``: step time of DDP + sequential freezing variants.

    Two CPU ranks, gloo.
    """
    import argparse
    import tempfile
    import traceback

    p = argparse.ArgumentParser(prog="python experiments/ddp_freeze_bench.py", description=bench_main.__doc__)
    p.add_argument("--variants", default="plain_nofreeze,rewrap_nofreeze,find_unused,rewrap,grad_mask,plain_freeze")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--period", type=int, default=10)
    p.add_argument("--per-stage", type=float, default=0.25)
    p.add_argument("--final-fraction", type=float, default=0.75)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the summary")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            for variant in args.variants.split(","):
                out = os.path.join(tmp, f"r{rep}")
                started, load = time.perf_counter(), os.getloadavg()[0]
                try:
                    _bench_worker_fit(variant, args, out)
                    row = _summarize(variant, os.path.join(out, variant), args)
                except Exception as exc:
                    msg = str(exc).strip().splitlines()
                    row = {"variant": variant, "error": f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]}
                    if os.environ.get("LRD_DEBUG"):
                        traceback.print_exc()
                row.update(repeat=rep, fit_s=round(time.perf_counter() - started, 1),
                           loadavg=[round(load, 2), round(os.getloadavg()[0], 2)])
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "pl": pl.__version__, "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    # Spawned DDP workers unpickle the callbacks by module name: run the copy imported as `ddp_freeze_bench`
    # (this folder on sys.path, which the workers inherit), not __main__'s.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from ddp_freeze_bench import bench_main as _bench

    sys.exit(_bench(sys.argv[1:]))
