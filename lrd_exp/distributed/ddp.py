"""Several devices per job: DDP that follows the freeze schedule, in workers the job spawns itself.

**DDP + freezing.** :class:`FreezeAwareDDPStrategy` is Lightning's ``DDPStrategy`` that re-wraps the model in a
fresh ``DistributedDataParallel`` whenever the set of trainable parameters changed (a freeze stage), right
before the next training step. DDP registers the parameters that require grad when it wraps the model; a
frozen factor then never produces a gradient and plain DDP fails ("Expected to have finished reduction in the
prior iteration ..."). The alternatives and why they lose (measured in ``docs/scaling.md`` with
``experiments/ddp_freeze_bench.py``):

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
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import LightningEnvironment
from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch.nn.parallel import DistributedDataParallel

from lrd_exp.config.validate import ConfigError
from lrd_exp.devices.npu import count_devices
from lrd_exp.freezing.callback import FreezingCallback

log = logging.getLogger("lrd_exp")

#: Strategy names (``device.strategy``) that mean "DDP": they get the freeze-aware strategy.
DDP_NAMES = {"auto": "spawn", "ddp": "spawn", "ddp_spawn": "spawn", "ddp_freeze": "spawn",
             "ddp_fork": "fork", "ddp_notebook": "fork"}


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
        self._signature = trainable_signature(module)
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
    """The job's own callbacks (this project's and the user's; Lightning's are left alone), in trainer order."""
    return [cb for cb in trainer.callbacks
            if type(cb).__module__.split(".")[0] not in ("pytorch_lightning", "lightning")]


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
            cb.schedule.apply(cb.frozen)  # as after a single-device fit (what the user froze stays frozen)
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
def external_launcher() -> str | None:
    """The name of a launcher that already started one process per device (torchrun, srun with several tasks)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
                                               and "GROUP_RANK" in os.environ):
        return "torchrun"
    if (int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
            and os.environ.get("SLURM_JOB_NAME", "") not in ("bash", "interactive")):
        return f"SLURM with {os.environ['SLURM_NTASKS']} tasks"
    return None



def check_strategy(strategy: Any) -> None:
    """``device.strategy`` before any work: one of this package's DDP names or a strategy Lightning registers
    (a typo would otherwise fail only when the Trainer is built, after the baseline trained)."""
    if not isinstance(strategy, str):
        return
    name = strategy.strip().lower()
    allowed = sorted(set(DDP_NAMES) | set(StrategyRegistry.available_strategies()))
    if name not in allowed:
        close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"device.strategy={strategy!r} is not allowed: {hint}choose one of {', '.join(allowed)}")


def ddp_strategy(device: Any, devices: Any, strategy: Any = "auto", *, num_nodes: int = 1,
                 **ddp_kwargs: Any) -> Any:
    """The Trainer ``strategy`` for ``device.devices`` devices: unchanged for one device, else freeze-aware DDP.

    ``strategy`` is ``device.strategy``: ``auto`` / ``ddp`` / ``ddp_spawn`` / ``ddp_freeze`` get
    :class:`FreezeAwareDDPStrategy` with spawned workers, ``ddp_fork`` / ``ddp_notebook`` the same with forked
    ones (CPU only); any other name or a Strategy instance is passed through untouched (e.g.
    ``ddp_find_unused_parameters_true`` to compare). On an Ascend NPU the process group is HCCL.
    """
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
