"""``task=train``, one job: baseline -> decompose -> fine-tune with freezing -> measure -> one result row.

:func:`train` keeps the row honest (written as ``running`` first, then ``ok`` or ``failed`` with the error, never
lost: :class:`~lrd_exp.tasks.job.JobRow`); :func:`train_job` is the job itself and reads top to bottom like the
pipeline.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import pandas as pd
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lrd_exp import results
from lrd_exp.config.schema import canonical_precision
from lrd_exp.config.schema import enum_value as _v
from lrd_exp.devices.npu import count_devices
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.freezing.callback import FreezingCallback
from lrd_exp.results.files import CURVES_FILENAME, RESULT_FILENAME
from lrd_exp.sweep.guard import warn_parallel_throughput
from lrd_exp.tasks.checkpoint import is_model_file
from lrd_exp.tasks.decomposition import (
    calibration_inputs,
    check_fields,
    check_inputs,
    decompose_copy,
    require_decomposed,
)
from lrd_exp.tasks.identity import identity_row
from lrd_exp.tasks.job import JobRow, objective_value
from lrd_exp.tasks.measure import measure_pair
from lrd_exp.tasks.models import RunModel, build_data, run_model
from lrd_exp.tasks.settings import bench_optimizer
from lrd_exp.timing.loop import BenchProbe, StepThroughput, fidelity_epochs, loop_fidelity
from lrd_exp.training.recipe import FinetuneRecipe, resolve_recipe
from lrd_exp.training.target import DEFAULT_TARGET_DROP, TimeToTarget
from lrd_exp.training.trainer import evaluate, finish_wandb, fit, make_loggers, make_wandb, validation_images

log = logging.getLogger("lrd_exp")


def train(cfg: DictConfig, device: DeviceInfo, out_dir: str) -> float | None:
    """Run one training job and write its row; returns the sweep objective (None for a failed job)."""
    existing = results.read_result(os.path.join(out_dir, RESULT_FILENAME))
    if existing and results.is_complete(existing) and not cfg.resume:
        log.info("%s in %s is complete: skipping this job (delete it to re-run)", RESULT_FILENAME, out_dir)
        print(results.format_summary(existing))
        return objective_value(cfg, existing)

    row = identity_row(cfg, out_dir)
    row.update(device=device.accelerator, device_name=device.name, parallel_jobs=warn_parallel_throughput(cfg))
    with JobRow(row, out_dir, announce=True) as job:
        wandb_logger = make_wandb(cfg.logger.wandb, out_dir, row, job_type=_v(cfg.task),
                                  config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        if wandb_logger is not None:
            job.on_close(lambda final: finish_wandb(wandb_logger, final))
        row.update(train_job(cfg, device, out_dir, wandb_logger))
    return objective_value(cfg, job.final)


def train_job(cfg: DictConfig, device: DeviceInfo, out_dir: str, wandb_logger: Any | None) -> dict[str, Any]:
    """The job's stages in order; returns the row's size, speed and quality fields."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_data(cfg)
    row: dict[str, Any] = dm.input_columns()  # the inputs the model is fed: its own pipeline on real photos
    from_file = is_model_file(cfg.model.checkpoint)  # a saved decomposed model: fine-tune it further, no SVD again
    calibration = None if from_file else calibration_inputs(cfg, dm)  # before any work
    evaluation = None if from_file else check_inputs(cfg, dm, calibration)

    # 1. the original: the baseline, trained once per defining config and cached for every job of a sweep (or the
    #    architecture of a model file's decomposed model)
    run = run_model(cfg, device, out_dir, dm, train_baseline=True)
    if run.from_file:
        decomposed = run.decomposed.train()
        results.write_text_atomic(os.path.join(out_dir, "decomposition.txt"), run.file_report())
    else:
        row.update(run.fields)
        row["top1_original"] = evaluate(cfg.trainer, cfg.device, device, run.original, dm, out_dir)

        # 2. decompose
        decomposed, fitted = decompose(cfg, device, dm, run.original, out_dir, calibration=calibration,
                                       evaluation=evaluation)
        row.update(fitted)
    original, curves = run.original, list(run.curves)
    row["top1_decomposed_pre"] = evaluate(cfg.trainer, cfg.device, device, decomposed, dm, out_dir)

    # 3. fine-tune with the freeze schedule, timed to the target accuracy (and stopped there, if asked),
    #    distilled from the original if asked (not from a model file's: its original is untrained)
    #    with the recipe for the start: trainer.calibrated's when the fit was to the activations
    target = target_callback(cfg, row)
    recipe = resolve_recipe(cfg.trainer, row.get("fit"))
    row["finetune_recipe"] = recipe.name
    teacher = original if recipe.distill and not from_file else None
    if recipe.distill and from_file:
        log.warning("trainer.distill ignored: a job that starts from a model file has no trained original to "
                    "learn from")
    log.info("fine-tuning recipe %s", recipe.describe())
    history, speed, probe, finetune_curve = finetune(cfg, device, dm, decomposed, out_dir, wandb_logger,
                                                     teacher=teacher, target=target, recipe=recipe)
    row.update(target_fields(cfg, target))
    row["distill_alpha"] = float(cfg.trainer.distill.alpha) if teacher is not None else None
    row["top1_decomposed"] = evaluate(cfg.trainer, cfg.device, device, decomposed, dm, out_dir)
    row["val_images"] = validation_images(dm, cfg.trainer.limit_val_batches)
    save_model(cfg, run, decomposed, out_dir, top1=row["top1_decomposed"])
    results.write_json_atomic(os.path.join(out_dir, "freeze_history.json"), history)
    curves += finetune_curve
    if curves:
        results.write_text_atomic(os.path.join(out_dir, CURVES_FILENAME), pd.DataFrame(curves).to_csv(index=False))

    # 4. measure original vs decomposed side by side (every freeze state, time-weighted)
    if cfg.bench.enabled:
        row.update(measure_pair(cfg, device, original, decomposed, dm, history=history))
    row.update(loop_fields(speed, probe, row, out_dir))
    return row


def save_model(cfg: DictConfig, run: RunModel, model: nn.Module, out_dir: str, **row: Any) -> str:
    """``model.pt``: the fine-tuned decomposed model, self-describing (lrd_exp.load_decomposed rebuilds it), with the
    rank settings it was decomposed with and the row's identity."""
    rank = run.file_rank() if run.from_file else OmegaConf.to_container(cfg.rank, resolve=True, enum_to_str=True)
    return run.save(model, os.path.join(out_dir, "model.pt"), rank=rank, row={**identity_row(cfg, out_dir), **row})


def decompose(cfg: DictConfig, device: DeviceInfo, dm: Any, original: nn.Module, out_dir: str, *,
              calibration: list[Any] | None = None, evaluation: list[Any] | None = None
              ) -> tuple[nn.Module, dict[str, Any]]:
    """A decomposed copy of ``original`` by the run's rank policy, fitted to ``calibration`` (training images) when
    given and checked against the original on ``evaluation`` (further training images); the per-layer report goes
    to the output dir. Returns (model, the row's fit and check columns)."""
    x, _ = dm.example_batch(1)
    decomposed, report = decompose_copy(cfg, device, dm, original, x, out_dir, calibration=calibration,
                                        evaluation=evaluation, table=True)
    log.info("decomposition: %s", report.summary())
    require_decomposed(cfg, report)
    return decomposed, {"fit": report.fit, "calibration_images": report.calibration_images,
                        "calibration_s": round(report.calibration_s, 3), "decompose_s": round(report.decompose_s, 3),
                        **check_fields(report)}


def finetune(cfg: DictConfig, device: DeviceInfo, dm: Any, decomposed: nn.Module, out_dir: str,
             wandb_logger: Any | None, *, teacher: nn.Module | None = None, target: TimeToTarget | None = None,
             recipe: FinetuneRecipe | None = None
             ) -> tuple[list[dict[str, Any]], StepThroughput, BenchProbe | None, list]:
    """Fine-tune ``decomposed`` in place with the freeze schedule: (freeze history, loop speed, probe, curve).

    ``teacher`` (the original; a copy is trained against, the caller's is untouched) turns on knowledge
    distillation; ``target`` (:class:`TimeToTarget`) records the time to accuracy, stops there if asked, and
    skips the fine-tuning when the model is already within the target and ``trainer.target_drop`` is set;
    ``recipe`` (:func:`resolve_recipe`; None: the configured one) gives the optimizer and BatchNorm's mode."""
    t = cfg.trainer
    recipe = recipe or resolve_recipe(t, None)
    freezer = FreezingCallback(cfg.freeze)
    speed = StepThroughput(device)
    if target is not None and target.skip_fit:
        log.info("fine-tuning skipped: top-1 before fine-tuning is already within trainer.target_drop=%g points of "
                 "the original's (%.2f)", target.drop, target.top1_original)
        return [], speed, None, []
    probe = make_probe(cfg, device, dm, speed)
    if t.finetune_epochs <= 0:
        return [], speed, probe, []
    loggers = make_loggers(cfg.logger, out_dir, "finetune") + ([wandb_logger] if wandb_logger is not None else [])
    before = [p.requires_grad for p in decomposed.parameters()]
    callbacks = [freezer, speed] + ([probe] if probe else []) + ([target] if target is not None else [])
    module = fit(t, cfg.device, device, decomposed, dm, epochs=t.finetune_epochs, optim=recipe.optim, out_dir=out_dir,
                 stage="finetune", callbacks=callbacks, loggers=loggers, resume=cfg.resume,
                 teacher=copy.deepcopy(teacher) if teacher is not None else None, bn=recipe.bn)
    for p, flag in zip(decomposed.parameters(), before):  # as before the fit: measurement applies each state
        p.requires_grad_(flag)
    return freezer.history, speed, probe, [dict(c, stage="finetune") for c in module.curve]


def target_callback(cfg: DictConfig, row: dict[str, Any]) -> TimeToTarget | None:
    """The time-to-accuracy callback against ``row``'s original top-1 (None without one: a model file's job)."""
    if row.get("top1_original") is None:
        return None
    drop = cfg.trainer.target_drop
    return TimeToTarget(row["top1_original"], drop, stop=drop is not None, top1_start=row.get("top1_decomposed_pre"))


def target_fields(cfg: DictConfig, target: TimeToTarget | None) -> dict[str, Any]:
    """The row's to-target columns; null epochs and seconds when never reached or not measurable."""
    if target is not None:
        return target.fields()
    drop = cfg.trainer.target_drop
    return {"target_drop": DEFAULT_TARGET_DROP if drop is None else float(drop), "finetune_epochs_to_target": None,
            "finetune_s_to_target": None}


def loop_fields(speed: StepThroughput, probe: BenchProbe | None, row: dict[str, Any], out_dir: str
                ) -> dict[str, Any]:
    """What the Lightning loop really achieved, against the side-by-side benchmark (and the probe, if on)."""
    fields: dict[str, Any] = {"train_ips_logged": speed.images_per_s,
                              "train_loop_overhead": speed.overhead_share}  # same steps: drift cannot move it
    if speed.images_per_s and row.get("train_ips_decomposed"):
        fields["train_ips_fidelity"] = speed.images_per_s / row["train_ips_decomposed"]
    fields.update(loop_fidelity(speed, probe))  # the same comparison, paired epoch by epoch: drift cancels
    per_epoch = fidelity_epochs(speed, probe)
    if per_epoch:
        results.write_text_atomic(os.path.join(out_dir, "fidelity.csv"), pd.DataFrame(per_epoch).to_csv(index=False))
    return fields


def make_probe(cfg: DictConfig, device: DeviceInfo, dm: Any, loop: StepThroughput | None = None) -> BenchProbe | None:
    """The benchmark step timed around every fine-tuning epoch (opt-in: ``bench.probe_steps``), exactly as the loop
    runs it (batch, precision, layout, optimizer), so ``train_ips_fidelity_paired`` compares the two seconds apart."""
    b, t = cfg.bench, cfg.trainer
    if not b.enabled or b.probe_steps < 1 or t.finetune_epochs < 1:
        return None
    if count_devices(device.accelerator, cfg.device.devices) * max(int(cfg.device.num_nodes), 1) > 1:
        return None  # DDP: each rank would time alone (the callback would skip it anyway; nothing to pickle)
    x, y = dm.example_batch(t.batch_size)  # kept on the CPU: each probe moves its own copy to the device
    return BenchProbe(x, y, steps=b.probe_steps, warmup=b.warmup,
                      precision=canonical_precision(t.precision), channels_last=bool(t.channels_last), device=device,
                      optimizer_factory=bench_optimizer(cfg), loop=loop)
