"""Time to accuracy (``trainer.target_drop``, the TimeToTarget callback) and knowledge distillation
(``trainer.distill``): the loss by hand, the teacher kept out of training, the stop at the first epoch within the
target, the skip when the decomposed model already is, the row's columns and the config checks."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lrd_exp.config.validate import ConfigError, validate
from lrd_exp.results import format_summary, make_row
from lrd_exp.training.classifier import Classifier, distillation_loss
from lrd_exp.training.target import DEFAULT_TARGET_DROP, TimeToTarget

pytestmark = pytest.mark.usefixtures("single_thread")


def _trainer(epochs: int, callbacks=(), **kwargs) -> pl.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, "num_sanity_val_steps": 0, **kwargs}
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=list(callbacks), **kwargs)


# ------------------------------------------------------------------ the distillation loss
def test_distillation_loss_equals_a_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]
    t = [[2.0, 0.0, 1.0], [0.5, 0.5, -0.5]]
    y = [1, 2]
    alpha, temp = 0.3, 2.0

    def softmax(row, scale=1.0):
        e = [math.exp(v / scale) for v in row]
        return [v / sum(e) for v in e]

    ce = sum(-math.log(softmax(si)[yi]) for si, yi in zip(s, y)) / 2
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(ti, temp), softmax(si, temp)))
             for si, ti in zip(s, t)) / 2
    expected = (1 - alpha) * ce + alpha * temp ** 2 * kl

    loss, kd = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=alpha, temperature=temp)
    assert kd.item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.7 * ce + 1.2 * kl)  # the numbers this example stands on
    # alpha=0 is plain cross-entropy; a teacher equal to the student adds nothing
    plain, _ = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=0.0, temperature=temp)
    assert plain.item() == pytest.approx(ce, rel=1e-6)
    same, kd0 = distillation_loss(torch.tensor(s), torch.tensor(s), torch.tensor(y), alpha=0.5, temperature=3.0)
    assert kd0.item() == pytest.approx(0.0, abs=1e-7) and same.item() == pytest.approx(0.5 * ce, rel=1e-6)


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append((batch[0].clone(), batch[1].clone(), float(outputs["loss"])))


def _data(n: int = 16, features: int = 4, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))


def test_training_step_uses_the_teachers_logits():
    """lr 0: the student stays put, so every step's loss must be distillation_loss of the batch, by the numbers."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    module = Classifier(student, 3, optim={"name": "sgd", "lr": 0.0, "momentum": 0.0, "weight_decay": 0.0,
                                           "scheduler": "none"},
                        teacher=teacher, distill_alpha=0.3, distill_temperature=2.0)
    losses = _Losses()
    _trainer(1, [losses], limit_val_batches=0).fit(module, DataLoader(_data(), batch_size=8))
    assert len(losses.seen) == 2
    with torch.no_grad():
        for x, y, loss in losses.seen:
            expected, kd = distillation_loss(student(x), teacher(x), y, alpha=0.3, temperature=2.0)
            assert loss == pytest.approx(expected.item(), rel=1e-5)
            assert kd.item() > 0.01  # a different teacher: the soft term is really there
            assert loss != pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-3)


def test_the_teacher_is_not_trained_optimized_or_saved(tmp_path):
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).train()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    module = Classifier(student, 3, optim={"name": "sgd", "lr": 0.5, "scheduler": "none"}, teacher=teacher,
                        distill_alpha=0.7, distill_temperature=4.0)

    class Check(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            self.opt_ids = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}

    check = Check()
    trainer = _trainer(3, [check], limit_val_batches=0)
    trainer.fit(module, DataLoader(_data(), batch_size=8))

    assert module.teacher is teacher
    assert not teacher.training  # eval mode, although Lightning put the student in train mode
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    assert not all(torch.equal(p, b) for p, b in zip(student.parameters(), student_before))  # the student trained
    assert check.opt_ids == {id(p) for p in student.parameters()}
    assert not check.opt_ids & {id(p) for p in teacher.parameters()}
    student_keys = {f"model.{k}" for k in student.state_dict()}
    assert set(module.state_dict()) == student_keys
    assert "teacher" not in "".join(n for n, _ in module.named_modules())
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == student_keys


def test_the_teacher_follows_the_students_dtype_and_layout():
    torch.manual_seed(0)
    conv = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    student, teacher = conv(), conv()
    module = Classifier(student, 3, optim={"name": "sgd", "lr": 0.1, "scheduler": "none"}, teacher=teacher,
                        channels_last=True)
    data = TensorDataset(torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,)))
    _trainer(1, limit_val_batches=0, precision="64-true").fit(module, DataLoader(data, batch_size=4))
    assert next(student.parameters()).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    assert teacher[0].weight.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------ the time-to-target callback
class _Scripted(nn.Module):
    """Top-1 on the validation set is exactly ``100 * level``: sample i of n is right when i / n < level."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(2, classes)  # something to optimize; its output counts for nothing
        self.classes, self.level = classes, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos, label = x[:, 0], x[:, 1].long()
        pred = torch.where(pos < self.level, label, (label + 1) % self.classes)
        return 10.0 * F.one_hot(pred, self.classes).float() + 0.0 * self.lin(x)


class _Improve(pl.Callback):
    """Each epoch starts a quarter better and 50 ms later: top-1 25, 50, 75, 100 at epochs 1..4."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl_module.model.level += 0.25
        time.sleep(0.05)


def _scripted_fit(target: TimeToTarget, epochs: int = 4, sanity: int = 2) -> Classifier:
    n = 8
    x = torch.stack([torch.arange(n) / n, (torch.arange(n) % 4).float()], dim=1)
    loader = DataLoader(TensorDataset(x, (torch.arange(n) % 4)), batch_size=4)
    module = Classifier(_Scripted(), 4, optim={"name": "sgd", "lr": 0.1, "scheduler": "none"})
    _trainer(epochs, [_Improve(), target], num_sanity_val_steps=sanity).fit(module, loader, loader)
    return module


def test_stops_at_the_first_epoch_within_the_target():
    target = TimeToTarget(80.0, 5.0, stop=True)  # target 75: epoch 3 (exactly on it)
    module = _scripted_fit(target, epochs=6)
    assert [c["val_top1"] for c in module.curve] == [25.0, 50.0, 75.0]  # stopped: no epochs 4..6
    # the sanity check (level 0, top-1 0) was not counted
    assert [(r["epochs"], r["top1"]) for r in target.records] == [(1, 25.0), (2, 50.0), (3, 75.0)]
    assert target.epochs_to_target == 3
    assert target.s_to_target == target.records[-1]["s"]
    assert 0.15 <= target.s_to_target < 30  # three 50 ms epochs at least, timed from fit start
    seconds = [r["s"] for r in target.records]
    assert seconds == sorted(seconds) and seconds[0] >= 0.05
    assert target.fields() == {"target_drop": 5.0, "finetune_epochs_to_target": 3,
                               "finetune_s_to_target": target.s_to_target}


def test_without_stop_it_records_and_runs_every_epoch():
    target = TimeToTarget(75.2)  # the default drop, 0.5 points: target 74.7, epoch 3
    module = _scripted_fit(target, epochs=4)
    assert target.drop == DEFAULT_TARGET_DROP == 0.5
    assert [c["val_top1"] for c in module.curve] == [25.0, 50.0, 75.0, 100.0]
    assert len(target.records) == 4 and target.epochs_to_target == 3
    assert target.s_to_target == target.records[2]["s"] < target.records[3]["s"]


def test_never_within_the_target_gives_null_columns():
    target = TimeToTarget(101.0, 0.5, stop=True)
    module = _scripted_fit(target, epochs=4)
    assert len(module.curve) == 4 and not target.reached
    fields = target.fields()
    assert fields == {"target_drop": 0.5, "finetune_epochs_to_target": None, "finetune_s_to_target": None}
    row = make_row(**fields, decompose_s=2.5)
    assert row["time_to_target_s"] is None
    assert "not reached" in format_summary(row)


def test_within_before_fine_tuning_is_zero_and_skips_only_when_stopping():
    stop = TimeToTarget(80.0, 5.0, stop=True, top1_start=76.0)
    assert stop.skip_fit and stop.fields() == {"target_drop": 5.0, "finetune_epochs_to_target": 0,
                                               "finetune_s_to_target": 0.0}
    assert not TimeToTarget(80.0, 5.0, stop=True, top1_start=74.0).skip_fit
    keep = TimeToTarget(80.0, 5.0, top1_start=76.0)
    assert not keep.skip_fit
    _scripted_fit(keep, epochs=2)
    assert keep.epochs_to_target == 0 and keep.s_to_target == 0.0 and len(keep.records) == 2


def test_time_to_target_s_is_decomposition_plus_fine_tuning():
    row = make_row(decompose_s=1.25, finetune_s_to_target=10.5, finetune_epochs_to_target=2, target_drop=0.5)
    assert row["time_to_target_s"] == pytest.approx(11.75)
    assert make_row(finetune_s_to_target=10.5)["time_to_target_s"] is None  # decompose_s missing
    assert make_row(decompose_s=3.0, finetune_s_to_target=0.0)["time_to_target_s"] == 3.0


def test_summary_prints_time_to_target_and_old_rows_still_format():
    row = make_row(fit="activations", calibration_images=256, calibration_s=1.2, decompose_s=1.8, target_drop=0.5,
                   finetune_epochs_to_target=2, finetune_s_to_target=12.3, distill_alpha=0.5, status="ok")
    text = format_summary(row)
    assert ("time to within 0.5 pt of the original's top-1: 2 epochs, 12.3 s fine-tuning, 14.1 s with "
            "decomposition (fit=activations, 256 calibration images, 1.2 s); distilled from the original "
            "(alpha=0.5)") in text
    old = {"model": "resnet18", "top1_original": 90.0, "status": "ok"}  # a row written before these columns
    assert "time to within" not in format_summary(old) and "status: ok" in format_summary(old)
    zero = format_summary(make_row(target_drop=1.0, finetune_epochs_to_target=0, finetune_s_to_target=0.0))
    assert "already within before fine-tuning (0 epochs)" in zero


# ------------------------------------------------------------------ the job: finetune() and a whole run
def test_finetune_is_skipped_when_already_within_the_target(cfg_factory, tmp_path):
    from lrd_exp.devices import resolve_device
    from lrd_exp.tasks.train import finetune, target_callback, target_fields

    cfg = cfg_factory(["trainer=smoke", "trainer.target_drop=1.0"])
    model = nn.Linear(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = target_callback(cfg, {"top1_original": 90.0, "top1_decomposed_pre": 89.5})
    history, speed, probe, curve = finetune(cfg, resolve_device("cpu"), object(), model, str(tmp_path), None,
                                            teacher=nn.Linear(4, 3), target=target)
    assert (history, probe, curve, speed.step_times) == ([], None, [], [])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not (tmp_path / "checkpoints").exists()  # no fit started
    assert target_fields(cfg, target) == {"target_drop": 1.0, "finetune_epochs_to_target": 0,
                                          "finetune_s_to_target": 0.0}
    # null target_drop: measured against 0.5 points and never stopping; no original top-1 (a model file's job)
    plain = cfg_factory(["trainer=smoke"])
    measured = target_callback(plain, {"top1_original": 90.0, "top1_decomposed_pre": 89.5})
    assert measured.drop == 0.5 and not measured.stop and measured.epochs_to_target == 0
    assert target_callback(plain, {"top1_original": None}) is None
    assert target_fields(plain, None) == {"target_drop": 0.5, "finetune_epochs_to_target": None,
                                          "finetune_s_to_target": None}


# fit=weights: no calibration pass (seconds instead of a minute on two cores); the to-target logic is the same
SMOKE = ["trainer=smoke", "logger=csv", "trainer.enable_progress_bar=false", "bench.enabled=false", "freeze=none",
         "rank.fit=weights"]


def test_a_distilled_job_records_the_time_to_target(cfg_factory, tmp_path):
    """A whole job with distillation: its row's to-target columns agree with its own fine-tuning curve."""
    from lrd_exp import tasks

    tasks.run(cfg_factory(SMOKE + ["trainer.distill.enabled=true", "trainer.distill.alpha=0.25"]))
    out = tmp_path / "out"
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "ok", row.get("error")
    assert row["distill_alpha"] == 0.25 and row["target_drop"] == 0.5
    for col in ("fit", "calibration_images", "calibration_s", "decompose_s", "finetune_epochs_to_target",
                "finetune_s_to_target", "time_to_target_s"):
        assert col in row
    curve = pd.read_csv(out / "curves.csv")
    fine = curve[curve.stage == "finetune"]
    assert len(fine) == 2  # trainer=smoke: two fine-tuning epochs, none stopped early (target_drop null)
    target = row["top1_original"] - 0.5
    if row["top1_decomposed_pre"] >= target - 1e-9:
        expected = 0
    else:
        hits = [i + 1 for i, v in enumerate(fine.val_top1) if v >= target - 1e-9]
        expected = hits[0] if hits else None
    assert row["finetune_epochs_to_target"] == expected
    assert (row["finetune_s_to_target"] is None) == (expected is None)
    if expected:
        assert 0 < row["finetune_s_to_target"] < row["duration_s"]
        assert row["time_to_target_s"] == pytest.approx(row["decompose_s"] + row["finetune_s_to_target"])
    ckpt = torch.load(out / "checkpoints" / "finetune" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])  # the teacher is not in the checkpoint


def test_a_job_already_within_target_drop_skips_fine_tuning(cfg_factory, tmp_path):
    from lrd_exp import tasks

    tasks.run(cfg_factory(SMOKE + ["trainer.target_drop=100", "trainer.baseline_epochs=0"]))
    out = tmp_path / "out"
    row = json.loads((out / "result.json").read_text())
    assert row["status"] == "ok", row.get("error")
    assert (row["target_drop"], row["finetune_epochs_to_target"], row["finetune_s_to_target"]) == (100.0, 0, 0.0)
    assert row["distill_alpha"] is None
    assert row["top1_decomposed"] == row["top1_decomposed_pre"]  # not one step of fine-tuning
    assert row["train_ips_logged"] is None
    assert not (out / "checkpoints" / "finetune").exists()
    assert row["fit"] == "weights" and row["decompose_s"] > 0
    assert row["time_to_target_s"] == pytest.approx(row["decompose_s"])  # + 0 s of fine-tuning


# ------------------------------------------------------------------ config
def test_defaults_of_the_new_keys(cfg_factory):
    cfg = cfg_factory()
    assert cfg.trainer.target_drop is None
    assert (cfg.trainer.distill.enabled, cfg.trainer.distill.alpha, cfg.trainer.distill.temperature) == \
        (False, 0.5, 2.0)
    validate(cfg_factory(["trainer.target_drop=0", "trainer.distill.alpha=1", "trainer.distill.temperature=0.5"]))


@pytest.mark.parametrize("overrides,needles", [
    (["trainer.target_drop=-1"], ["trainer.target_drop=-1", ">= 0", "null"]),
    (["trainer.distill.alpha=1.5"], ["trainer.distill.alpha=1.5", "[0, 1]"]),
    (["trainer.distill.alpha=-0.1"], ["trainer.distill.alpha=-0.1", "[0, 1]"]),
    (["trainer.distill.temperature=0"], ["trainer.distill.temperature=0", "> 0"]),
])
def test_validate_names_the_bad_key(cfg_factory, overrides, needles):
    with pytest.raises(ConfigError) as info:
        validate(cfg_factory(overrides))
    message = str(info.value)
    assert "\n" not in message.strip()
    for needle in needles:
        assert needle in message, (needle, message)


def test_a_wrong_type_fails_at_composition(cfg_factory):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="target_drop"):
        cfg_factory(["trainer.target_drop=lots"])
