"""The fine-tuning recipe of a calibrated start (``trainer.calibrated``): resolved from the fit, what the Classifier
really trains with in a job, BatchNorm's statistics kept in eval mode, and bad keys stopped with one line."""

from __future__ import annotations

import importlib
import json

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrd_exp.config.validate import ConfigError, validate
from lrd_exp.training.classifier import BATCHNORMS, Classifier
from lrd_exp.training.recipe import CALIBRATED, CONFIGURED, resolve_recipe

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------ resolving the recipe
def test_activations_get_the_calibrated_recipe_and_weights_the_configured_one(cfg_factory):
    cfg = cfg_factory([])
    cal = resolve_recipe(cfg.trainer, "activations")
    assert (cal.name, cal.optim["name"], cal.optim["lr"], cal.optim["warmup_epochs"], cal.distill, cal.bn) == \
        (CALIBRATED, "sgd", pytest.approx(0.01 * 0.1), 0.5, True, "train")
    assert cal.optim["momentum"] == 0.9 and cal.optim["weight_decay"] == 5e-4  # the rest of finetune_optim stays
    for fit in ("weights", None):  # None: a model file's job, whose fit is not known
        plain = resolve_recipe(cfg.trainer, fit)
        assert (plain.name, plain.optim["lr"], plain.optim["warmup_epochs"], plain.distill, plain.bn) == \
            (CONFIGURED, 0.01, 0.0, False, "train")


def test_the_lr_scale_is_relative_to_the_arch_optimizer_and_keys_apply(cfg_factory):
    vit = resolve_recipe(cfg_factory(["arch=vit_tiny_digits"]).trainer, "activations")
    assert (vit.optim["name"], vit.optim["lr"], vit.optim["weight_decay"]) == ("adamw", pytest.approx(3e-5), 0.05)
    cfg = cfg_factory(["trainer.calibrated.lr_scale=0.5", "trainer.calibrated.warmup_epochs=null",
                       "trainer.finetune_optim.warmup_epochs=1", "trainer.calibrated.distill=false",
                       "trainer.calibrated.bn=eval"])
    r = resolve_recipe(cfg.trainer, "activations")
    assert (r.optim["lr"], r.optim["warmup_epochs"], r.distill, r.bn) == (pytest.approx(0.005), 1.0, False, "eval")
    asked = resolve_recipe(cfg_factory(["trainer.calibrated.distill=false", "trainer.distill.enabled=true"]).trainer,
                           "activations")
    assert asked.distill  # trainer.distill.enabled asks for it whatever the start
    off = resolve_recipe(cfg_factory(["trainer.calibrated.enabled=false"]).trainer, "activations")
    assert (off.name, off.optim["lr"], off.distill, off.bn) == (CONFIGURED, 0.01, False, "train")
    assert resolve_recipe(cfg_factory([]).trainer, "activations").describe() == (
        "calibrated: sgd lr 0.001, warm-up 0.5 epochs, cosine, distilled from the original, BatchNorm in train mode")


# ------------------------------------------------------------------ BatchNorm in eval mode
def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 3))
    net[1].running_mean.uniform_(-1, 1)  # statistics a calibration left, not the init's
    net[1].running_var.uniform_(0.5, 2)
    return net


def _fit(bn: str, epochs: int = 2) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    net = _bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
    module = Classifier(net, 3, optim={"name": "sgd", "lr": 0.1, "scheduler": "none"}, bn=bn)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))  # validation in between
    return net, before


def test_bn_eval_keeps_the_running_statistics_bit_identical_while_the_rest_trains():
    net, before = _fit("eval")
    bn = net[1]
    assert torch.equal(bn.running_mean, before["1.running_mean"]) and torch.equal(bn.running_var,
                                                                                    before["1.running_var"])
    assert int(bn.num_batches_tracked) == 0
    assert not torch.equal(bn.weight, before["1.weight"]) and not torch.equal(net[0].weight, before["0.weight"])
    trained, _ = _fit("train")  # the same steps in train mode move them: the check above can fail
    assert not torch.equal(trained[1].running_mean, before["1.running_mean"])
    assert int(trained[1].num_batches_tracked) == 8


def test_bn_eval_mode_survives_every_call_to_train():
    module = Classifier(_bn_net(), 3, bn="eval").train()
    modes = {type(m).__name__: m.training for m in module.model.modules()}
    assert modes == {"Sequential": True, "Conv2d": True, "BatchNorm2d": False, "ReLU": True, "Flatten": True,
                     "Linear": True}
    assert all(isinstance(m, BATCHNORMS) for m in module.model.modules() if not m.training)
    assert not module.eval().model[0].training and Classifier(_bn_net(), 3).train().model[1].training


# ------------------------------------------------------------------ what a job's fine-tuning really gets
SMOKE = ["trainer=smoke", "logger=csv", "trainer.enable_progress_bar=false", "bench.enabled=false", "freeze=none",
         "rank.fit=weights"]


def _job(cfg_factory, tmp_path, monkeypatch, fit: str, overrides: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """One smoke job whose decomposition reports ``fit`` (a weight fit underneath: seconds, not a calibration pass);
    returns (the row, what the fine-tuning Classifier held: lr, teacher, BatchNorm mode and statistics kept)."""
    from lrd_exp import tasks

    train_task = importlib.import_module("lrd_exp.tasks.train")  # the package exports a function of that name

    real_decompose, real_fit, seen = train_task.decompose, train_task.fit, {}

    def decompose(*args, **kwargs):
        model, fitted = real_decompose(*args, **kwargs)
        return model, dict(fitted, fit=fit)

    def fit_spy(t, placement, device, model, dm, **kwargs):
        stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, BATCHNORMS)]
        module = real_fit(t, placement, device, model, dm, **kwargs)
        if kwargs["stage"] == "finetune":
            kept = all(torch.equal(a, m.running_mean) for a, m in
                       zip(stats, [m for m in model.modules() if isinstance(m, BATCHNORMS)]))
            seen.update(lr=module.optim["lr"], warmup=module.optim.get("warmup_epochs"), bn=module.bn,
                        teacher=module.teacher is not None, bn_kept=kept, n_bn=len(stats))
        return module

    monkeypatch.setattr(train_task, "decompose", decompose)
    monkeypatch.setattr(train_task, "fit", fit_spy)
    tasks.run(cfg_factory(SMOKE + list(overrides)))
    row = json.loads((tmp_path / "out" / "result.json").read_text())
    assert row["status"] == "ok", row.get("error")
    return row, seen


@pytest.mark.parametrize("bn", ["train", "eval"])
def test_a_job_fine_tunes_an_activation_fit_with_the_calibrated_recipe(cfg_factory, tmp_path, monkeypatch, bn):
    row, seen = _job(cfg_factory, tmp_path, monkeypatch, "activations", (f"trainer.calibrated.bn={bn}",))
    assert (row["fit"], row["finetune_recipe"], row["distill_alpha"]) == ("activations", CALIBRATED, 0.5)
    assert seen["n_bn"] > 0
    assert seen == {"lr": pytest.approx(0.001), "warmup": 0.5, "bn": bn, "teacher": True, "bn_kept": bn == "eval",
                    "n_bn": seen["n_bn"]}


def test_a_job_fine_tunes_a_weight_fit_with_the_configured_recipe(cfg_factory, tmp_path, monkeypatch):
    row, seen = _job(cfg_factory, tmp_path, monkeypatch, "weights")
    assert (row["fit"], row["finetune_recipe"], row["distill_alpha"]) == ("weights", CONFIGURED, None)
    assert seen == {"lr": 0.01, "warmup": 0.0, "bn": "train", "teacher": False, "bn_kept": False,
                    "n_bn": seen["n_bn"]}


# ------------------------------------------------------------------ bad keys
@pytest.mark.parametrize("override,key", [
    ("trainer.calibrated.lr_scale=0", "trainer.calibrated.lr_scale"),
    ("trainer.calibrated.lr_scale=-0.1", "trainer.calibrated.lr_scale"),
    ("trainer.calibrated.warmup_epochs=-1", "trainer.calibrated.warmup_epochs"),
])
def test_a_bad_calibrated_value_stops_with_one_line(cfg_factory, override, key):
    with pytest.raises(ConfigError) as info:
        validate(cfg_factory([override]))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key}={override.split('=', 1)[1]}") and "allowed" in message
    validate(cfg_factory(["trainer.calibrated.lr_scale=2", "trainer.calibrated.warmup_epochs=0"]))


@pytest.mark.parametrize("override,allowed", [
    ("trainer.calibrated.bn=frozen", ["train", "eval"]),
    ("trainer.calibrated.enabled=maybe", []),
    ("trainer.calibrated.lr_scale=fast", []),
])
def test_a_bad_calibrated_type_fails_at_composition(cfg_factory, override, allowed):
    with pytest.raises(ConfigCompositionException) as info:
        cfg_factory([override])
    message = f"{info.value}\n{info.value.__cause__}"
    key, bad = override.split("=", 1)
    assert key.rsplit(".", 1)[1] in message and bad in message
    assert all(v in message for v in allowed), message


def test_the_classifier_refuses_an_unknown_bn_mode():
    with pytest.raises(ValueError, match="bn='frozen' is not allowed: choose one of train, eval"):
        Classifier(_bn_net(), 3, bn="frozen")
