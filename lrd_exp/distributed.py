"""Several devices per job (DDP that follows the freeze schedule) and parallel sweeps that keep timings honest.

**DDP + freezing.** :class:`FreezeAwareDDPStrategy` is Lightning's ``DDPStrategy`` that re-wraps the model in a
fresh ``DistributedDataParallel`` whenever the set of trainable parameters changed (a freeze stage), right
before the next training step. DDP registers the parameters that require grad when it wraps the model; a
frozen factor then never produces a gradient and plain DDP fails ("Expected to have finished reduction in the
prior iteration ..."). The alternatives and why they lose (measured in ``docs/scaling.md``,
``python -m lrd_exp.distributed bench``):

- ``find_unused_parameters=True``: correct, but every step traverses the autograd graph and still all-reduces
  the (zero) buckets of frozen factors, so freezing saves less communication than it could;
- keeping ``requires_grad`` on and masking frozen gradients: bit-exact but computes every weight gradient
  (it throws away what sequential freezing saves, the point of the paper);
- a DDP communication hook: it sees only buckets whose gradients all arrived, so it cannot fix a missing one;
- ``static_graph=True``: assumes the used parameters never change; a freeze stage breaks that assumption.

Re-wrapping costs one DDP construction per stage change (shape check + broadcast of rank 0's weights, which
also re-asserts that every rank holds the same frozen factors); between stage changes the step is plain DDP
over the trainable parameters only (the per-step check is a tuple of ``requires_grad`` flags).

**Processes.** :func:`ddp_strategy` starts the DDP workers with ``spawn`` from inside the job (not Lightning's
default, which re-runs the whole command in each rank: under Hydra that re-runs the baseline, the
decomposition, the measurements and, in a multirun, the sweep). Only ``fit`` runs in the workers; the
weights, the training curve and the freeze history come back to the job, which does the rest once.

**Parallel sweeps.** Parallel jobs on one machine disturb each other's throughput. The Hydra callback
:class:`ParallelThroughputGuard` (``hydra.callbacks.parallel_guard``) counts how many jobs of a sweep can run at
once (joblib ``n_jobs``, every job of a ``submitit_local`` sweep); when throughput is measured it warns loudly
(``action=warn``, the default), forces ``n_jobs=1`` (``serialize``, joblib only) or stops (``error``), and every
job's result row records ``parallel_jobs`` (:func:`warn_parallel_throughput`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch.nn.parallel import DistributedDataParallel

from lrd_exp.config import enum_value as _v
from lrd_exp.freezing import FreezingCallback, set_frozen

log = logging.getLogger("lrd_exp")

#: Environment variable through which the sweep-level guard tells each job how many jobs run at once.
PARALLEL_ENV = "LRD_PARALLEL_JOBS"
#: Strategy names (``device.strategy``) that mean "DDP": they get the freeze-aware strategy.
DDP_NAMES = {"auto": "spawn", "ddp": "spawn", "ddp_spawn": "spawn", "ddp_freeze": "spawn",
             "ddp_fork": "fork", "ddp_notebook": "fork"}
GUARD_ACTIONS = ("warn", "serialize", "error")


def _rank_zero_log(msg: str, *args: Any, level: int = logging.INFO) -> None:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        log.log(level, msg, *args)


# ============================================================================================ DDP + freezing
def trainable_signature(module: torch.nn.Module) -> tuple[bool, ...]:
    """Which parameters require grad, in ``parameters()`` order: what a DDP wrapper was built for."""
    return tuple(p.requires_grad for p in module.parameters())


class FreezeAwareDDPStrategy(DDPStrategy):
    """DDP that re-wraps the model when the trainable set changed (freeze stages), before the training step.

    Every rank changes ``requires_grad`` at the same step (the freeze schedule is a function of the global
    step or epoch, and the frozen set is broadcast from rank 0), so every rank re-wraps at the same step and
    the collectives inside ``DistributedDataParallel.__init__`` line up. A model with no trainable parameter
    left runs unwrapped (nothing to reduce).

    ``rewraps`` lists ``{"step", "trainable_tensors", "seconds"}`` for every (re)wrap, the first one included.
    """

    strategy_name = "ddp_freeze"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._signature: tuple[bool, ...] | None = None
        self._params: list[torch.nn.Parameter] = []
        self.rewraps: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ wrapping
    def _wrap(self, step: int) -> None:
        module = self.lightning_module
        assert module is not None
        started = time.perf_counter()
        old = self.model
        if isinstance(old, DistributedDataParallel):
            try:  # the old reducer must not keep hooks on parameters it no longer owns
                old._remove_autograd_hooks()
            except (AttributeError, RuntimeError):  # pragma: no cover - older torch
                pass
        self.model = module
        del old
        n_trainable = sum(p.requires_grad for p in module.parameters())
        if n_trainable:
            self.model = self._setup_model(module)
            self._register_ddp_hooks()
        self._params = list(module.parameters())  # fixed during fit; iterating a list keeps the check cheap
        self._signature = tuple(p.requires_grad for p in self._params)
        self.rewraps.append({"step": step, "trainable_tensors": int(n_trainable),
                             "seconds": round(time.perf_counter() - started, 6)})

    def configure_ddp(self) -> None:
        self._wrap(step=-1)

    def sync_trainable(self) -> bool:
        """Re-wrap if ``requires_grad`` changed since the last wrap; returns whether it did."""
        module = self.lightning_module
        if module is None or self._signature is None:
            return False
        if all(p.requires_grad is t for p, t in zip(self._params, self._signature)):
            return False
        step = module.trainer.global_step if module._trainer is not None else -1
        self._wrap(step=step)
        _rank_zero_log("[ddp] trainable set changed at step %d: re-wrapped DDP around %d trainable tensors (%.3f s)",
                       step, self.rewraps[-1]["trainable_tensors"], self.rewraps[-1]["seconds"])
        return True

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self.sync_trainable()
        return super().training_step(*args, **kwargs)

    def _configure_launcher(self) -> None:
        if self._start_method == "popen":
            super()._configure_launcher()
        else:
            self._launcher = FreezeStateLauncher(self, start_method=self._start_method)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description="DDP that re-wraps at freeze stages "
                                       "(spawned workers)", start_method="spawn")


FreezeAwareDDPStrategy.register_strategies(StrategyRegistry)


# ------------------------------------------------------------------ state the spawned workers send back
def _is_plain(value: Any, depth: int = 0) -> bool:
    """None, bool, int, float, str, and lists / tuples / dicts of them: safe to send and to assign."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth > 6:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _own_callbacks(trainer: pl.Trainer) -> list[pl.Callback]:
    """This project's callbacks (Lightning's own are left alone), in trainer order."""
    return [cb for cb in trainer.callbacks if type(cb).__module__.split(".")[0] == "lrd_exp"]


def _worker_state(trainer: pl.Trainer) -> dict[str, Any]:
    """What rank 0 sends back besides the weights: plain-data attributes of the LightningModule (public lists
    and dicts, e.g. ``Classifier.curve``) and of this project's callbacks (e.g. ``FreezingCallback.history``,
    ``StepThroughput.step_times``), each freezer's frozen keys and the strategy's re-wraps."""
    module = trainer.lightning_module
    return {
        "module": {k: v for k, v in vars(module).items()
                   if not k.startswith("_") and isinstance(v, (list, dict)) and _is_plain(v)},
        "callbacks": [{k: v for k, v in vars(cb).items() if _is_plain(v)} for cb in _own_callbacks(trainer)],
        "frozen": [[f.key for f in cb.frozen] if isinstance(cb, FreezingCallback) else None
                   for cb in _own_callbacks(trainer)],
        "rewraps": list(getattr(trainer.strategy, "rewraps", [])),
    }


def _restore_worker_state(trainer: pl.Trainer, state: dict[str, Any]) -> None:
    module = trainer.lightning_module
    for key, value in state["module"].items():
        setattr(module, key, value)
    for cb, attrs, frozen in zip(_own_callbacks(trainer), state["callbacks"], state["frozen"]):
        for key, value in attrs.items():
            setattr(cb, key, value)
        if isinstance(cb, FreezingCallback) and frozen is not None:
            cb.setup(trainer, module, "fit")  # builds the schedule over the main process' model
            by_key = {f.key: f for f in cb.schedule.factors}
            cb.frozen = [by_key[k] for k in frozen if k in by_key]
            set_frozen(cb.schedule.factors, cb.frozen, cb.schedule.freeze_bias)  # as after a single-device fit
    if hasattr(trainer.strategy, "rewraps"):
        trainer.strategy.rewraps = state["rewraps"]


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the job process dies (a killed or timed-out job leaves no orphan
    ranks spinning on the machine, e.g. under submitit_local or joblib)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort
        pass


class FreezeStateLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher that also brings back rank 0's curve, freeze history and callback records.

    Lightning returns rank 0's weights and ``callback_metrics``; the pipeline also reads ``Classifier.curve``,
    ``FreezingCallback.history`` (the freeze states the benchmark replays) and ``StepThroughput``'s step times
    after ``fit`` (see :func:`_worker_state`).
    """

    def launch(self, function: Any, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except torch.multiprocessing.ProcessRaisedException as exc:  # one line for the result row, not a traceback
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            raise RuntimeError(f"DDP worker {exc.error_index} failed: {lines[-1] if lines else exc}") from exc

    def _wrapping_function(self, process_idx: int, *args: Any, **kwargs: Any) -> None:
        _die_with_parent()
        return super()._wrapping_function(process_idx, *args, **kwargs)

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        extra["lrd_state"] = _worker_state(trainer)
        return extra

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if "lrd_state" in extra:
            _restore_worker_state(trainer, extra["lrd_state"])


# ------------------------------------------------------------------ construction
def count_devices(accelerator: str, devices: Any) -> int:
    """How many devices Lightning's ``devices`` value (int, -1, "auto", "0,1", [0, 1]) asks for on ``accelerator``."""
    from lrd_exp.devices import _count_devices

    if accelerator == "cuda":
        auto = torch.cuda.device_count()
    elif accelerator == "npu":
        from lrd_exp.devices import NPUAccelerator

        auto = NPUAccelerator.auto_device_count()
    else:
        auto = 1
    try:
        return _count_devices(devices, auto)
    except (TypeError, ValueError):
        return 1


def external_launcher() -> str | None:
    """The name of a launcher that already started one process per device (torchrun, srun with several tasks)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
                                               and "GROUP_RANK" in os.environ):
        return "torchrun"
    if (int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
            and os.environ.get("SLURM_JOB_NAME", "") not in ("bash", "interactive")):
        return f"SLURM with {os.environ['SLURM_NTASKS']} tasks"
    return None


def ddp_strategy(device: Any, devices: Any, strategy: Any = "auto", *, num_nodes: int = 1,
                 **ddp_kwargs: Any) -> Any:
    """The Trainer ``strategy`` for ``device.devices`` devices: unchanged for one device, else freeze-aware DDP.

    ``strategy`` is ``device.strategy``: ``auto`` / ``ddp`` / ``ddp_spawn`` / ``ddp_freeze`` get
    :class:`FreezeAwareDDPStrategy` with spawned workers, ``ddp_fork`` / ``ddp_notebook`` the same with forked
    ones (CPU only); any other name or a Strategy instance is passed through untouched (e.g.
    ``ddp_find_unused_parameters_true`` to compare). On an Ascend NPU the process group is HCCL.
    """
    from lrd_exp.validation import ConfigError

    accelerator = getattr(device, "accelerator", str(device))
    n = count_devices(accelerator, devices)
    if n * max(int(num_nodes), 1) <= 1 or not isinstance(strategy, str):
        return strategy
    name = strategy.strip().lower()
    if name not in DDP_NAMES:
        if name.startswith("ddp") and not name.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
            log.warning("device.strategy=%s starts its workers by re-running the command (Lightning 'popen'): under "
                        "Hydra every rank re-runs the whole job; prefer device.strategy=ddp (spawned workers)", name)
        return strategy
    if int(num_nodes) > 1:
        raise ConfigError(f"device.num_nodes={num_nodes}: a job runs in one process and spawns its DDP workers on "
                          "its own node; use one node per job (device.num_nodes=1, hydra.launcher.nodes=1)")
    outside = external_launcher()
    if outside:
        raise ConfigError(f"device.devices={devices}: this job was started by {outside}, one process per device, "
                          "but a job spawns its own DDP workers: start one process per job (SLURM: "
                          "hydra.launcher.tasks_per_node=1 with hydra.launcher.gpus_per_node="
                          f"{n}; no torchrun)")
    start_method = DDP_NAMES[name]
    if start_method == "fork" and accelerator != "cpu":
        raise ConfigError(f"device.strategy={name} forks the job after {accelerator} was initialised, which "
                          "fails; use device.strategy=ddp (spawned workers)")
    if accelerator == "npu":
        ddp_kwargs.setdefault("process_group_backend", "hccl")
    _rank_zero_log("[ddp] %d x %s: DistributedDataParallel in %s-started workers, re-wrapped at each freeze stage",
                   n, accelerator, start_method)
    return FreezeAwareDDPStrategy(cluster_environment=LightningEnvironment(), start_method=start_method,
                                  **ddp_kwargs)


def broadcast_keys(trainer: pl.Trainer, keys: list[str]) -> list[str]:
    """Rank 0's list on every rank (identity on one device): every rank freezes the same factors."""
    strategy = getattr(trainer, "strategy", None)
    if strategy is None or getattr(strategy, "world_size", 1) <= 1:
        return keys
    return list(strategy.broadcast(list(keys), src=0))


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

    Frozen: ``requires_grad`` off, or in a :class:`FreezingCallback`'s frozen set. ``<dir>/rank<r>.pt`` holds ``{"rank", "frozen_at": {name: (step, tensor)}, "final": {name: tensor},
    "rewraps": [...], "step_times": [...]}``; :func:`compare_replicas` checks a set of them. Place it after the
    freezing callback: a factor's value is taken right after it was frozen, before the next update.
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
    dumps = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    ref = dumps[0]
    frozen_changed = sorted({n for d in dumps for n, (_, v) in d["frozen_at"].items()
                             if not torch.equal(v, d["final"][n])})
    mismatched = sorted(n for n in ref["final"] if any(not torch.equal(ref["final"][n], d["final"][n])
                                                       for d in dumps[1:]))
    frozen_sets = [sorted(d["frozen_at"]) for d in dumps]
    return {"ranks": [d["rank"] for d in dumps], "frozen": frozen_sets[0],
            "same_frozen_sets": all(s == frozen_sets[0] for s in frozen_sets),
            "frozen_changed": frozen_changed, "mismatched": mismatched}


# ============================================================================================ parallel sweeps
def measures_throughput(cfg: Any) -> bool:
    """True when the job times anything: ``task=benchmark`` or ``bench.enabled``."""
    task = _v(OmegaConf.select(cfg, "task", default="train")) if isinstance(cfg, DictConfig) else "train"
    enabled = OmegaConf.select(cfg, "bench.enabled", default=True) if isinstance(cfg, DictConfig) else True
    return str(task) == "benchmark" or bool(enabled)


def sweep_size(overrides: Iterable[str], params: dict[str, Any] | None = None) -> int | None:
    """Jobs in a basic sweep (product of the discrete sweep overrides and ``hydra.sweeper.params``); None if not countable."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    items = list(overrides) + [f"{k}={v}" for k, v in (params or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides(items)
    except Exception:
        return None
    n = 1
    for o in parsed:
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                return None
            n *= len(list(o.sweep_string_iterator()))
    return n


def _joblib_workers(n_jobs: Any) -> int:
    n = int(n_jobs if n_jobs is not None else 1)
    cpus = os.cpu_count() or 1
    if n < 0:
        return max(cpus + 1 + n, 1)
    return max(n, 1)


def launcher_kind(launcher: Any) -> str:
    """``basic`` | ``joblib`` | ``submitit_local`` | ``submitit_slurm`` | the launcher's class name."""
    target = str((launcher or {}).get("_target_", "") if hasattr(launcher, "get") else "")
    if not target or target.endswith("BasicLauncher"):
        return "basic"
    if target.endswith("JoblibLauncher"):
        return "joblib"
    if target.endswith("submitit_launcher.LocalLauncher"):
        return "submitit_local"
    if target.endswith("submitit_launcher.SlurmLauncher"):
        return "submitit_slurm"
    return target.rsplit(".", 1)[-1]


def sweep_concurrency(cfg: DictConfig) -> int | None:
    """How many jobs of this multirun can run at the same time on one machine (None: unknown, maybe several)."""
    hydra = cfg.hydra
    sweeper = hydra.get("sweeper", {}) or {}
    total = sweep_size(OmegaConf.to_container(hydra.overrides.task, resolve=False) or [],
                       OmegaConf.to_container(sweeper.get("params"), resolve=False) if sweeper.get("params") else None)
    if sweeper.get("n_jobs") is not None:  # optuna & co: trials launched per batch
        total = int(sweeper.get("n_jobs"))
    if sweeper.get("max_batch_size") is not None and total is not None:
        total = min(total, int(sweeper.get("max_batch_size")))
    kind = launcher_kind(hydra.get("launcher"))
    if kind in ("basic", "submitit_slurm"):  # one after the other / one allocation each
        return 1
    if kind == "joblib":
        workers = _joblib_workers(hydra.launcher.get("n_jobs", 1))
        return min(workers, total) if total is not None else workers
    if kind == "submitit_local":  # submitit's local executor starts every job at once
        return total
    return None


class ParallelThroughputGuard:
    """Hydra callback: parallel jobs on one machine + throughput measurement -> warn (default), serialize or stop.

    Configured in ``conf/config.yaml``::

        hydra:
          callbacks:
            parallel_guard:
              _target_: lrd_exp.distributed.ParallelThroughputGuard
              action: warn      # warn | serialize | error

    ``warn``: one loud message at sweep start and end; every job's row gets ``parallel_jobs`` (> 1: its
    images/s were measured next to other jobs). ``serialize``: joblib runs one job at a time
    (``n_jobs=1``); a ``submitit_local`` sweep cannot be throttled and stops with a hint. ``error``: stops.
    """

    def __init__(self, action: str = "warn", **_: Any) -> None:
        if action not in GUARD_ACTIONS:
            raise ValueError(f"hydra.callbacks.parallel_guard.action={action!r} is not allowed: choose one of "
                             f"{', '.join(GUARD_ACTIONS)}")
        self.action = action
        self.concurrency: int | None = 1
        self.flagged = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        n = sweep_concurrency(config)
        kind = launcher_kind(config.hydra.get("launcher"))
        self.concurrency = n
        self.flagged = (n is None or n > 1) and measures_throughput(config)
        if self.flagged and self.action == "serialize":
            if kind != "joblib":
                raise RuntimeError(
                    f"[lrd_exp] parallel_guard: hydra/launcher={kind} runs every job of this sweep at once and "
                    "cannot be serialized; use the default launcher (drop hydra/launcher) or "
                    "hydra/launcher=joblib, or set bench.enabled=false")
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.launcher.n_jobs = 1
            print(f"[lrd_exp] parallel_guard: throughput is measured, so the joblib launcher runs one job at a "
                  f"time (hydra.launcher.n_jobs {n} -> 1)", file=sys.stderr)
            self.concurrency, self.flagged = 1, False
        os.environ[PARALLEL_ENV] = str(self.concurrency if self.concurrency is not None else 0)
        if not self.flagged:
            return
        what = f"up to {n} jobs" if n is not None else "several jobs (how many is unknown)"
        message = (f"[lrd_exp] WARNING: {what} of this sweep run at the same time on one machine "
                   f"(hydra/launcher={kind}) while throughput is measured: their images/s disturb each other. "
                   "Rows get parallel_jobs > 1; for valid timings run the sweep with hydra.launcher.n_jobs=1 "
                   "(joblib), the default launcher, or one SLURM job per device; or set bench.enabled=false "
                   "for an accuracy-only sweep.")
        if self.action == "error":
            raise RuntimeError(message.replace("WARNING", "parallel_guard (action=error)"))
        print(message, file=sys.stderr)  # stderr, not the logger: Hydra would print it a second time

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.flagged:
            print(f"[lrd_exp] reminder: the images/s of this sweep were measured with {self.concurrency or 'several'} "
                  "jobs in parallel (column parallel_jobs); do not compare them with serial runs.", file=sys.stderr)

    # Hydra calls these too; nothing to do
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None: ...
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None: ...


def parallel_jobs() -> int | None:
    """How many jobs of the current sweep may run at once next to this one (1: alone; None: unknown)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # pragma: no cover
        hydra = None
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return 1
    value = os.environ.get(PARALLEL_ENV)
    if value is not None:
        n = int(value)
        return n if n > 0 else None
    kind = launcher_kind(hydra.get("launcher"))  # the guard callback is not configured: best guess
    if kind == "joblib":
        return _joblib_workers(hydra.launcher.get("n_jobs", 1))
    if kind == "submitit_local":
        return None
    return 1


def warn_parallel_throughput(cfg: DictConfig) -> int | None:
    """The job's ``parallel_jobs`` column; logs a warning when this job's timings share the machine."""
    n = parallel_jobs()
    if (n is None or n > 1) and measures_throughput(cfg):
        log.warning("this job runs next to %s other job(s) of its sweep on the same machine: its images/s are "
                    "disturbed (result column parallel_jobs=%s)", "some" if n is None else n - 1, n)
    return n


# ============================================================================================ measurement
def _bench_worker_fit(variant: str, args: Any, out_dir: str) -> None:
    """One variant of the DDP + freezing comparison: a 2-process CPU fit, step times and replica dumps."""
    import copy

    import timm
    from torch.utils.data import DataLoader, TensorDataset

    from lrd_exp.decompose import decompose_model
    from lrd_exp.module import Classifier

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
    dumps = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
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
    """``python -m lrd_exp.distributed bench``: step time of DDP + sequential freezing variants (2 CPU ranks, gloo)."""
    import argparse
    import tempfile
    import traceback

    p = argparse.ArgumentParser(prog="python -m lrd_exp.distributed bench", description=bench_main.__doc__)
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
    if len(sys.argv) > 1 and sys.argv[1] == "bench":
        from lrd_exp.distributed import bench_main as _bench  # the importable module: spawn pickles by name

        sys.exit(_bench(sys.argv[2:]))
    print("usage: python -m lrd_exp.distributed bench [--help]", file=sys.stderr)
    sys.exit(2)
