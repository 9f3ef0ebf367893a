"""``task=evaluate``: a saved model (a job's ``model.pt``, a state_dict or a Lightning checkpoint) on the
configured dataset: top-1, inference speed and the latency of one image, in one row."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from lrd_exp.decompose.layers import FactorizedLayer
from lrd_exp.devices.resolve import DeviceInfo
from lrd_exp.results.row import STATUS_OK
from lrd_exp.tasks.identity import identity_row
from lrd_exp.tasks.job import JobRow
from lrd_exp.tasks.models import build_data, run_model
from lrd_exp.tasks.settings import bench_batch_size, bench_channels_last, bench_precision
from lrd_exp.timing.flops import count_flops, count_params
from lrd_exp.timing.steps import prepare_inference
from lrd_exp.training.trainer import evaluate as top1_of
from lrd_exp.training.trainer import validation_images


def evaluate(cfg: DictConfig, device: DeviceInfo, out_dir: str) -> float | None:
    """Top-1 and speed of the model at ``model.checkpoint``; returns its top-1 (the sweep objective)."""
    row: dict[str, Any] = identity_row(cfg, out_dir)
    row.update(device=device.accelerator, device_name=device.name)
    with JobRow(row, out_dir, what="evaluation") as job:
        row.update(measure_model(cfg, device, out_dir))
    final = job.final
    side = "decomposed" if final.get("top1_decomposed") is not None else "original"
    return final.get(f"top1_{side}") if final["status"] == STATUS_OK else None


def measure_model(cfg: DictConfig, device: DeviceInfo, out_dir: str) -> dict[str, Any]:
    """The row fields of the loaded model: the decomposed columns for a decomposed model, else the original's."""
    b = cfg.bench
    batch = bench_batch_size(cfg)
    dm = build_data(cfg)
    model = run_model(cfg, device, out_dir, dm).model
    side = "decomposed" if any(isinstance(m, FactorizedLayer) for m in model.modules()) else "original"
    fields: dict[str, Any] = {f"top1_{side}": top1_of(cfg.trainer, cfg.device, device, model, dm, out_dir),
                              "val_images": validation_images(dm, cfg.trainer.limit_val_batches), **dm.input_columns()}
    x, _ = dm.example_batch(batch)
    kw = {"precision": bench_precision(cfg), "channels_last": bench_channels_last(cfg), "compile": b.compile,
          "device": device}
    speed = prepare_inference(model, x, **kw).time(warmup=b.warmup, steps=b.steps)
    latency = prepare_inference(model, x[:1], **kw).time(warmup=b.warmup, steps=b.steps)
    fields.update({
        f"params_{side}": count_params(model), f"flops_{side}": count_flops(model.cpu(), x[:1], train=False),
        f"infer_ips_{side}": speed.ips, f"infer_ips_{side}_min": speed.ips_min, f"infer_ips_{side}_max": speed.ips_max,
        f"latency_ms_{side}": latency.median_s * 1e3, f"latency_ms_{side}_p90": latency.quantile_s(0.9) * 1e3,
    })
    return fields
