"""One job: baseline -> decompose -> fine-tune with freezing -> measure -> result row.

``run(cfg)`` is the pure entry point behind ``run.py`` (and tests); it returns the sweep objective (the
decomposed model's training throughput, or None for a failed job) so an Optuna sweeper can optimise it.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrd_exp import results
from lrd_exp.allocator import malloc_mode, tune_malloc
from lrd_exp.baseline import get_or_train
from lrd_exp.config import enum_value as _v
from lrd_exp.data import build_datamodule
from lrd_exp.decompose import decompose_model
from lrd_exp.devices import DeviceInfo, resolve_device, trainer_device_kwargs
from lrd_exp.distributed import count_devices, ddp_strategy, warn_parallel_throughput
from lrd_exp.fidelity import BenchProbe, fidelity_epochs, loop_fidelity
from lrd_exp.freezing import FreezingCallback
from lrd_exp.measure import StepThroughput, compare, comparison_fields, schedule_states
from lrd_exp.module import Classifier, make_optimizer
from lrd_exp.validation import ConfigError, validate

log = logging.getLogger("lrd_exp")


# ---------------------------------------------------------------------------------------------- context
def output_dir(cfg: DictConfig) -> str:
    out = cfg.paths.get("output_dir") if "output_dir" in cfg.paths else None
    if not out:
        from hydra.core.hydra_config import HydraConfig

        out = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else os.getcwd()
    os.makedirs(out, exist_ok=True)
    return out


CODE_PATHS = ("lrd_exp", "conf", "run.py", "pyproject.toml")


def git_commit(root: str | None = None) -> str | None:
    """HEAD's short hash, '-dirty' when the code that runs (CODE_PATHS) has uncommitted changes."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        # only the code that runs: results/ and docs written between jobs must not mark later rows dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return None


def overrides_string() -> str:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return " ".join(HydraConfig.get().overrides.task)


def variant_choice() -> str | None:
    """The ``variant=`` config group this job was composed with (the paper's variant names), if any."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    choice = HydraConfig.get().runtime.choices.get("variant")
    return None if choice in (None, "null") else str(choice)


def identity_row(cfg: DictConfig, out_dir: str) -> dict[str, Any]:
    rank = OmegaConf.to_container(cfg.rank, resolve=True, enum_to_str=True)
    freeze = OmegaConf.to_container(cfg.freeze, resolve=True, enum_to_str=True)
    return {
        "model": cfg.model.name, "dataset": cfg.dataset.name, "task": _v(cfg.task), "variant": variant_choice(),
        "rank_policy": rank["policy"], "rank_ratio": rank["ratio"], "rank_energy": rank["energy"],
        "rank_multiple": rank["multiple"], "rank_params": json.dumps(rank, sort_keys=True),
        "freeze": freeze["schedule"], "freeze_params": json.dumps(freeze, sort_keys=True),
        "device": _v(cfg.device.accelerator), "precision": str(cfg.bench.precision or cfg.trainer.precision),
        "batch_size": cfg.bench.batch_size or cfg.trainer.batch_size, "channels_last": bench_channels_last(cfg),
        "malloc": malloc_mode(), "seed": cfg.seed,
        "git_commit": git_commit(), "overrides": overrides_string(),
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "output_dir": out_dir,
    }


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: DictConfig, *, num_classes: int, in_chans: int, image_size: int) -> nn.Module:
    m = cfg.model
    kwargs = dict(OmegaConf.to_container(m.kwargs, resolve=True) or {})
    kwargs.update(num_classes=num_classes, in_chans=in_chans, drop_rate=m.drop_rate)
    size = m.image_size or image_size
    try:
        try:
            model = timm.create_model(m.name, pretrained=m.pretrained, img_size=size, **kwargs)
        except TypeError:  # architectures without an image-size argument (CNNs)
            model = timm.create_model(m.name, pretrained=m.pretrained, **kwargs)
    except RuntimeError as exc:
        if m.pretrained:
            raise RuntimeError(f"model.pretrained=true: could not load timm weights for {m.name!r} "
                               f"(they are downloaded from the internet on first use): {exc}") from exc
        raise
    if m.checkpoint:
        load_checkpoint(model, m.checkpoint)
    return model


def load_checkpoint(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"model.checkpoint={path!r} could not be read ({type(exc).__name__}): "
                          "is it a torch state_dict or Lightning checkpoint?") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.checkpoint={path!r} holds a {type(state).__name__}, not a state_dict")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"model.checkpoint={path!r} does not fit {type(model).__name__}: {first}") from None


# ---------------------------------------------------------------------------------------------- training
def make_trainer(cfg: DictConfig, device: DeviceInfo, *, epochs: int, out_dir: str, stage: str,
                 callbacks: list[pl.Callback] | None = None, loggers: list[Any] | None = None,
                 checkpoint: bool = False) -> pl.Trainer:
    t = cfg.trainer
    cbs = list(callbacks or [])
    if checkpoint:
        cbs.append(pl.callbacks.ModelCheckpoint(dirpath=os.path.join(out_dir, "checkpoints", stage),
                                                save_last=True, save_top_k=0, every_n_epochs=1))
    devices, num_nodes = cfg.device.devices, cfg.device.num_nodes
    if stage == "eval":  # one device: exact top-1 (a DistributedSampler pads with repeats), no worker start-up
        devices, num_nodes, strategy = 1, 1, "auto"
    else:  # several devices: DDP in spawned workers, re-wrapped at each freeze stage (lrd_exp.distributed)
        strategy = ddp_strategy(device, devices, cfg.device.strategy, num_nodes=num_nodes)
    kwargs = trainer_device_kwargs(device, devices, str(t.precision), strategy)
    if kwargs.get("plugins") is None:
        kwargs.pop("plugins", None)
    # a step cap spreads over the epochs, so smoke runs still validate, log curves and change freeze stages
    limit_train = max(1, -(-t.max_steps // max(epochs, 1))) if t.max_steps > 0 else 1.0
    return pl.Trainer(
        max_epochs=epochs, max_steps=t.max_steps if t.max_steps > 0 else -1, limit_train_batches=limit_train,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, enable_model_summary=False,
        enable_checkpointing=checkpoint, logger=loggers if loggers else False, callbacks=cbs,
        num_nodes=num_nodes, default_root_dir=out_dir, num_sanity_val_steps=0, **kwargs)


def evaluate(cfg: DictConfig, device: DeviceInfo, model: nn.Module, dm: pl.LightningDataModule,
             out_dir: str) -> float:
    trainer = make_trainer(cfg, device, epochs=1, out_dir=out_dir, stage="eval")
    module = Classifier(model, dm.num_classes, channels_last=cfg.trainer.channels_last)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)
    return 100.0 * float(metrics[0]["val/acc"])


def fit(cfg: DictConfig, device: DeviceInfo, model: nn.Module, dm: pl.LightningDataModule, *, epochs: int,
        optim: Any, out_dir: str, stage: str, callbacks: list[pl.Callback] | None = None,
        loggers: list[Any] | None = None, resume: bool = False) -> Classifier:
    module = Classifier(model, dm.num_classes, optim=OmegaConf.to_container(optim, resolve=True),
                        max_steps=cfg.trainer.max_steps, channels_last=cfg.trainer.channels_last)
    trainer = make_trainer(cfg, device, epochs=epochs, out_dir=out_dir, stage=stage, callbacks=callbacks,
                           loggers=loggers, checkpoint=True)
    ckpt = os.path.join(out_dir, "checkpoints", stage, "last.ckpt")
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt if resume and os.path.isfile(ckpt) else None)
    if resume and os.path.isfile(ckpt):
        log.info("resumed %s from %s", stage, ckpt)
    return module


def make_loggers(cfg: DictConfig, out_dir: str, stage: str) -> list[Any]:
    from pytorch_lightning.loggers import CSVLogger

    loggers: list[Any] = []
    if cfg.logger.csv:
        version = stage
        if os.path.isdir(os.path.join(out_dir, "csv", stage)):  # a resumed or repeated run keeps the old logs
            version = f"{stage}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        loggers.append(CSVLogger(save_dir=out_dir, name="csv", version=version))
    return loggers


def make_wandb(cfg: DictConfig, out_dir: str, row: dict[str, Any]) -> Any | None:
    w = cfg.logger.wandb
    if not w.enabled or w.mode == "disabled":
        return None
    from pytorch_lightning.loggers import WandbLogger

    sweep = os.path.basename(os.path.dirname(out_dir)) if "multirun" in out_dir else "single"
    return WandbLogger(project=w.project, entity=w.entity, save_dir=out_dir, offline=w.mode == "offline",
                       group=sweep, job_type=_v(cfg.task), tags=list(w.tags),
                       name=f"{row['model']}-{row['rank_policy']}-{row['freeze']}",
                       config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


# ---------------------------------------------------------------------------------------------- the job
def run(cfg: DictConfig) -> float | None:
    """Run one job and write its result row. User errors raise ConfigError before any file is written."""
    validate(cfg)
    tune_malloc(_v(cfg.device.malloc))
    device = resolve_device(_v(cfg.device.accelerator))
    out_dir = output_dir(cfg)
    if _v(cfg.task) == "benchmark":
        from lrd_exp.benchmark import run_benchmark

        return run_benchmark(cfg, device, out_dir)
    existing = results.read_result(os.path.join(out_dir, "result.json"))
    if existing and results.is_complete(existing) and not cfg.resume:
        log.info("result.json in %s is complete: skipping this job (delete it to re-run)", out_dir)
        print(results.format_summary(existing))
        return objective_value(cfg, existing)

    row = identity_row(cfg, out_dir)
    row.update(device=device.accelerator, device_name=device.name, status="running",
               parallel_jobs=warn_parallel_throughput(cfg))
    results.write_result(out_dir, results.make_row(**row))
    started = time.perf_counter()
    wandb_logger = None
    try:
        wandb_logger = make_wandb(cfg, out_dir, row)
        row.update(train_job(cfg, device, out_dir, wandb_logger))
        row["status"] = "ok"
    except KeyboardInterrupt:
        row.update(status="failed", error="interrupted")
        raise
    except Exception as exc:
        log.exception("job failed")
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        row["duration_s"] = round(time.perf_counter() - started, 2)
        final = results.make_row(**row)
        results.write_result(out_dir, final)
        if wandb_logger is not None:
            _finish_wandb(wandb_logger, final)
        print(results.format_summary(final))
        print(f"result row: {os.path.join(out_dir, 'result.json')}")
    return objective_value(cfg, final)


def write_failed_row(cfg: DictConfig, error: str) -> str | None:
    """A sweep job stopped by a user error before it began: a failed row, unless a finished one is there."""
    try:
        out_dir = output_dir(cfg)
        path = os.path.join(out_dir, "result.json")
        existing = results.read_result(path)
        if existing and results.is_complete(existing):
            return None  # never replace a finished row
        row = identity_row(cfg, out_dir)
        row.update(status="failed", error=error, device=_v(cfg.device.accelerator))
        results.write_result(out_dir, results.make_row(**row))
        return path
    except Exception:  # the row is a courtesy: the one-line error is already printed
        log.debug("could not write a failed row", exc_info=True)
        return None


def objective_value(cfg: DictConfig, row: dict[str, Any]) -> float | None:
    """The sweep objective: ``objective.metric`` of an ok row, or -drop when top-1 fell too far."""
    if row.get("status") != "ok":
        return None
    drop, limit = row.get("top1_drop"), cfg.objective.max_top1_drop
    if limit is not None and drop is not None and drop > limit:
        return -float(drop)
    value = row.get(cfg.objective.metric)
    return float(value) if isinstance(value, (int, float)) else None


def _finish_wandb(wandb_logger: Any, row: dict[str, Any]) -> None:
    import wandb

    try:
        run = wandb_logger.experiment
        for key, value in row.items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                run.summary[key] = value
    finally:
        wandb.finish()


def train_job(cfg: DictConfig, device: DeviceInfo, out_dir: str, wandb_logger: Any | None) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    t = cfg.trainer
    dm = build_datamodule(cfg.dataset, batch_size=t.batch_size, seed=cfg.seed, data_dir=cfg.paths.data_dir)
    shape = {"num_classes": dm.num_classes, "in_chans": dm.in_chans, "image_size": dm.image_size}
    row: dict[str, Any] = {}

    # 1. baseline: trained once per defining config, cached for every job of a sweep
    def train_baseline() -> dict:
        model = build_model(cfg, **shape)
        curve = []
        if t.baseline_epochs > 0:
            log.info("training the baseline: %s, %d epochs", cfg.model.name, t.baseline_epochs)
            module = fit(cfg, device, model, dm, epochs=t.baseline_epochs, optim=t.baseline_optim,
                         out_dir=out_dir, stage="baseline", loggers=make_loggers(cfg, out_dir, "baseline"))
            curve = module.curve
        return {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "curve": curve}

    entry, hit, path = get_or_train(cfg, train_baseline)
    row.update(baseline_cache_hit=hit, baseline_path=path)
    original = build_model(cfg, **shape)
    original.load_state_dict(entry["state_dict"])
    curves = [dict(c, stage="baseline") for c in entry.get("curve", [])]
    row["top1_original"] = evaluate(cfg, device, original, dm, out_dir)

    # 2. decompose
    x, _ = dm.example_batch(1)
    decomposed = copy.deepcopy(original)
    report = decompose_model(decomposed, **cfg.rank, example_input=x, rank_search=rank_search_context(
        cfg, device, dm))
    log.info("decomposition: %s", report.summary())
    report.to_frame().to_csv(os.path.join(out_dir, "decomposition.csv"), index=False)
    results.write_text_atomic(os.path.join(out_dir, "decomposition.txt"), report.table(max_rows=None) + "\n")
    row["top1_decomposed_pre"] = evaluate(cfg, device, decomposed, dm, out_dir)

    # 3. fine-tune with the freeze schedule
    freezer = FreezingCallback(cfg.freeze)
    speed = StepThroughput(device)
    probe = make_probe(cfg, device, dm, speed)
    loggers = make_loggers(cfg, out_dir, "finetune") + ([wandb_logger] if wandb_logger is not None else [])
    history: list[dict[str, Any]] = []
    if t.finetune_epochs > 0:
        module = fit(cfg, device, decomposed, dm, epochs=t.finetune_epochs, optim=t.finetune_optim,
                     out_dir=out_dir, stage="finetune", callbacks=[freezer, speed] + ([probe] if probe else []),
                     loggers=loggers, resume=cfg.resume)
        curves += [dict(c, stage="finetune") for c in module.curve]
        history = freezer.history
        for p in decomposed.parameters():  # measurement applies each state itself
            p.requires_grad_(True)
    row["top1_decomposed"] = evaluate(cfg, device, decomposed, dm, out_dir)
    results.write_json_atomic(os.path.join(out_dir, "freeze_history.json"), history)
    if curves:
        import pandas as pd

        results.write_text_atomic(os.path.join(out_dir, "curves.csv"), pd.DataFrame(curves).to_csv(index=False))

    # 4. measure original vs decomposed side by side (every freeze state, time-weighted)
    if cfg.bench.enabled:
        row.update(measure_pair(cfg, device, original, decomposed, dm, history=history))
    # fidelity: the images/s the Lightning loop really achieved vs the side-by-side benchmark
    row["train_ips_logged"] = speed.images_per_s
    if speed.images_per_s and row.get("train_ips_decomposed"):
        row["train_ips_fidelity"] = speed.images_per_s / row["train_ips_decomposed"]
    row["train_loop_overhead"] = speed.overhead_share  # same steps as train_ips_logged: drift cannot move it
    row.update(loop_fidelity(speed, probe))  # the same comparison, paired epoch by epoch: drift cancels
    per_epoch = fidelity_epochs(speed, probe)
    if per_epoch:
        import pandas as pd

        results.write_text_atomic(os.path.join(out_dir, "fidelity.csv"), pd.DataFrame(per_epoch).to_csv(index=False))
    return row


def make_probe(cfg: DictConfig, device: DeviceInfo, dm: Any, loop: StepThroughput | None = None) -> BenchProbe | None:
    """The benchmark step timed around every fine-tuning epoch, exactly as the loop runs it (batch, precision,
    layout, optimizer), so ``train_ips_fidelity_paired`` compares the loop with the benchmark seconds apart."""
    b, t = cfg.bench, cfg.trainer
    if not b.enabled or b.probe_steps < 1 or t.finetune_epochs < 1:
        return None
    if count_devices(device.accelerator, cfg.device.devices) * max(int(cfg.device.num_nodes), 1) > 1:
        return None  # DDP: each rank would time alone (the callback would skip it anyway; nothing to pickle)
    x, y = dm.example_batch(t.batch_size)  # kept on the CPU: each probe moves its own copy to the device
    return BenchProbe(x, y, steps=b.probe_steps, warmup=b.warmup,
                      precision=str(t.precision), channels_last=bool(t.channels_last), device=device,
                      optimizer_factory=bench_optimizer(cfg), loop=loop)


def rank_search_context(cfg: DictConfig, device: DeviceInfo, dm: Any) -> dict[str, Any]:
    """What rank.policy=optimized needs to time candidates like the run will execute them."""
    b = cfg.bench
    return {"batch_size": b.batch_size or cfg.trainer.batch_size, "device": device,
            "precision": str(b.precision or cfg.trainer.precision), "channels_last": bench_channels_last(cfg),
            "cache_dir": os.path.join(cfg.paths.cache_dir, "rank_timings"), "warmup": b.warmup,
            "steps": b.steps, "output_dir": output_dir(cfg)}


def bench_channels_last(cfg: DictConfig) -> bool:
    """The benchmark's layout: ``bench.channels_last``, or the training loop's when that is null."""
    value = cfg.bench.channels_last
    return bool(cfg.trainer.channels_last if value is None else value)


def bench_optimizer(cfg: DictConfig) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The fine-tuning loop's optimizer (SGD or AdamW, with its momentum and weight decay), for the benchmark."""
    optim = OmegaConf.to_container(cfg.trainer.finetune_optim, resolve=True)
    return functools.partial(make_optimizer, optim=optim)


def freeze_total_units(cfg: DictConfig, steps_per_epoch: int | None = None) -> int:
    t = cfg.trainer
    if _v(cfg.freeze.unit) == "step":
        if t.max_steps > 0:
            return t.max_steps
        return t.finetune_epochs * (steps_per_epoch or 1)
    return max(t.finetune_epochs, 1)


def measure_pair(cfg: DictConfig, device: DeviceInfo, original: nn.Module, decomposed: nn.Module, dm: Any,
                 history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    b = cfg.bench
    batch = b.batch_size or cfg.trainer.batch_size
    x, y = dm.example_batch(batch)
    x, y = x.to(device.torch_device), y.to(device.torch_device)
    original, decomposed = original.to(device.torch_device), decomposed.to(device.torch_device)
    steps_per_epoch = None
    if _v(cfg.freeze.unit) == "step" and not cfg.trainer.max_steps > 0:
        dm.setup("fit")
        steps_per_epoch = len(dm.train_dataloader())
    states = schedule_states(decomposed, cfg.freeze, freeze_total_units(cfg, steps_per_epoch), history,
                            example_input=x[:1])
    log.info("measuring throughput: batch %d, %d freeze state(s), %d warm-up + %d timed steps", batch,
             len(states), b.warmup, b.steps)
    orig, dec = compare(original, decomposed, states, x, y, warmup=b.warmup, steps=b.steps, rounds=b.rounds,
                        precision=str(b.precision or cfg.trainer.precision), channels_last=bench_channels_last(cfg),
                        compile=b.compile, device=device, min_time_s=b.min_time_s, switch_warmup=b.switch_warmup,
                        optimizer_factory=bench_optimizer(cfg))
    return comparison_fields(original, decomposed, orig, dec, x)
