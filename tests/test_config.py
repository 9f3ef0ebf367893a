"""The typed config: every group option composes, bad enums fail at composition, bad ranges fail validation."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from torch import nn

from lrd_exp import decompose_model
from lrd_exp.config.validate import ConfigError, validate
from lrd_exp.decompose import FactorizedLayer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "dataset", "freeze", "device", "trainer", "logger", "arch", "experiment")


def _options() -> list[tuple[str, str]]:
    opts = []
    for group in GROUPS:
        folder = CONF_DIR / group
        if folder.is_dir():
            opts += [(group, p.stem) for p in sorted(folder.glob("*.yaml"))]
    return opts


OPTIONS = _options()


def test_every_group_has_options():
    found = {g for g, _ in OPTIONS}
    assert {"model", "dataset", "freeze", "device", "trainer", "logger"} <= found
    # the contract's freeze and device choices all exist as files
    names = {(g, n) for g, n in OPTIONS}
    for n in ("none", "sequential", "alternating", "first", "last", "largest"):
        assert ("freeze", n) in names
    for n in ("cpu", "cuda", "npu", "auto"):
        assert ("device", n) in names


def _plain(node):
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def _assert_subset(expected, actual, where):
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for k, v in expected.items():
            assert k in actual, f"{where}.{k} missing from the composed config"
            _assert_subset(v, actual[k], f"{where}.{k}")
    else:
        assert actual == expected or (isinstance(expected, (int, float)) and not isinstance(expected, bool)
                                      and actual == pytest.approx(expected)), f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("group,name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_every_option_composes(cfg_factory, group, name):
    cfg = cfg_factory([f"{group}={name}"], wandb=group in ("logger", "experiment"))
    assert OmegaConf.select(cfg, "rank.policy") is not None
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), resolve=False)
    raw.pop("defaults", None)
    if group in ("experiment", "arch"):  # global package: its keys land at the top level
        raw.pop("hydra", None)  # not part of the job config
        target = _plain(cfg)
        where = ""
    else:
        target = _plain(cfg[group])
        where = group
    # every value the option file sets is what the composed config holds (enums compared by name)
    resolved = {k: v for k, v in raw.items() if not (isinstance(v, str) and "${" in v)}
    _assert_subset(resolved, target, where)
    # the composed config is still fully typed: enum keys keep their Enum type
    assert type(cfg.freeze.schedule).__name__ == "FreezeKind"
    assert type(cfg.device.accelerator).__name__ == "Accelerator"


def test_defaults_compose_and_validate(cfg_factory):
    cfg = cfg_factory([])
    assert _plain(cfg.rank.policy) == "quantized"
    assert _plain(cfg.freeze.schedule) == "sequential"
    assert cfg.model.name == "resnet18" and cfg.dataset.name == "digits"
    assert cfg.logger.wandb.enabled is False
    validate(cfg)  # the main job's config is valid


def test_cfg_factory_points_outputs_at_tmp(cfg_factory, tmp_path):
    cfg = cfg_factory([])
    for key in ("cache_dir", "data_dir", "output_dir"):
        assert Path(cfg.paths[key]).is_relative_to(tmp_path)
    assert cfg_factory([], wandb=True).logger.wandb.enabled is True
    assert cfg_factory(["paths.cache_dir=/x/y"]).paths.cache_dir == "/x/y"


@pytest.mark.parametrize("override,key,allowed", [
    ("rank.policy=bogus", "rank.policy", ["none", "ratio", "energy", "quantized", "optimized", "fixed"]),
    ("freeze.schedule=bogus", "freeze.schedule", ["none", "sequential", "alternating", "first", "last", "largest"]),
    ("device.accelerator=tpu", "device.accelerator", ["auto", "cpu", "cuda", "npu"]),
    ("device.malloc=jemalloc", "device.malloc", ["tuned", "system"]),
    ("freeze.unit=hour", "freeze.unit", ["epoch", "step"]),
    ("freeze.importance=random", "freeze.importance",
     ["weight_change", "grad_norm", "depth", "reverse_depth", "size"]),
    ("rank.rounding=sideways", "rank.rounding", ["nearest", "up", "down"]),
    ("task=eval", "task", ["train", "benchmark"]),
    ("trainer.precision=fp8", "trainer.precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "bf16"]),
    ("bench.precision=fp8", "bench.precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true", "bf16"]),
    ("trainer.finetune_optim.name=adam", "trainer.finetune_optim.name", ["sgd", "adamw"]),
    ("trainer.baseline_optim.scheduler=step", "trainer.baseline_optim.scheduler", ["cosine", "none"]),
    ("logger.wandb.mode=ofline", "logger.wandb.mode", ["offline", "online", "disabled"]),  # it logged online
    ("rank.fit=activation", "rank.fit", ["auto", "weights", "activations"]),
    ("rank.calibrate=both", "rank.calibrate", ["independent", "sequential"]),
])
def test_bad_enum_fails_at_composition(cfg_factory, override, key, allowed):
    with pytest.raises(ConfigCompositionException) as info:
        cfg_factory([override])
    # what the user sees: Hydra prints the exception and its cause
    message = f"{info.value}\n{info.value.__cause__}"
    assert key in message
    bad = override.split("=", 1)[1]
    assert bad in message
    for value in allowed:
        assert value in message, f"allowed value {value!r} not named in: {message}"


def test_bad_type_fails_at_composition(cfg_factory):
    with pytest.raises(ConfigCompositionException) as info:
        cfg_factory(["trainer.batch_size=abc"])
    assert "trainer.batch_size" in f"{info.value}\n{info.value.__cause__}"


def test_unknown_group_option_lists_the_choices(cfg_factory):
    with pytest.raises(ConfigCompositionException) as info:
        cfg_factory(["freeze=bogus"])
    message = str(info.value)
    assert "freeze/bogus" in message
    for name in ("sequential", "alternating", "none"):
        assert name in message


# ------------------------------------------------------------------ decompose_model(model, **cfg.rank)
class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 64, 3, padding=1)
        self.pw = nn.Conv2d(64, 64, 1)
        self.fc1 = nn.Linear(64, 96)
        self.head = nn.Linear(96, 10)
        with torch.no_grad():  # exactly rank 4: an energy threshold keeps at most 4 singular values
            self.pw.weight.copy_((torch.randn(64, 4) @ torch.randn(4, 64))[:, :, None, None])
            self.fc1.weight.copy_(torch.randn(96, 4) @ torch.randn(4, 64))

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.fc1(x.mean((2, 3)))))


@pytest.mark.parametrize("overrides,check", [
    ([], "quantized"),
    (["rank.policy=ratio", "rank.ratio=3"], "ratio"),
    (["rank.policy=energy", "rank.energy=0.9"], "energy"),
    (["rank.policy=fixed", "rank.rank=8"], "fixed"),
    (["rank.policy=none"], "none"),
])
def test_decompose_model_accepts_composed_rank_node(cfg_factory, overrides, check):
    torch.manual_seed(0)
    cfg = cfg_factory(overrides)
    model = _Small()
    x = torch.randn(2, 1, 12, 12)
    before = sum(p.numel() for p in model.parameters())
    report = decompose_model(model, **cfg.rank, example_input=x)
    after = sum(p.numel() for p in model.parameters())
    assert report.policy == check
    assert model(x).shape == (2, 10)
    factorized = {n for n, m in model.named_modules() if isinstance(m, FactorizedLayer)}
    if check == "none":
        assert not factorized and after == before
        return
    # stem and head are skipped by default (rank.skip_stem / skip_head); the middle layers are decomposed
    assert "stem" not in factorized and "head" not in factorized
    assert {"conv", "pw", "fc1"} <= factorized
    assert after < before
    assert report.params_before == before and report.params_after == after
    ranks = [r for layer in report.decomposed for r in layer.ranks]
    if check == "quantized":
        assert all(r % 8 == 0 for r in ranks), ranks
    if check == "fixed":
        assert all(r == 8 for r in ranks), ranks
    if check == "energy":
        by_name = {layer.name: layer for layer in report.decomposed}
        assert by_name["pw"].ranks[0] <= 4 and by_name["fc1"].ranks[0] <= 4
        for layer in report.decomposed:  # SVD: err^2 <= 1 - energy; HOSVD (two truncated modes): <= 2 (1 - energy)
            bound = (1 - 0.9) * (1 if layer.kind == "svd" else 2)
            assert layer.rel_error ** 2 <= bound + 1e-4, (layer.name, layer.rel_error)


# ------------------------------------------------------------------ validate(): range checks
@pytest.mark.parametrize("overrides,needles", [
    (["rank.ratio=1"], ["rank.ratio", "> 1"]),
    (["rank.ratio=0.5"], ["rank.ratio", "0.5"]),
    (["rank.policy=energy", "rank.energy=0"], ["rank.energy", "(0, 1]"]),
    (["rank.policy=quantized", "rank.base=energy", "rank.energy=1.5"], ["rank.energy"]),
    (["rank.multiple=0"], ["rank.multiple", ">= 1"]),
    (["rank.policy=fixed"], ["rank.rank"]),
    (["rank.policy=optimized", "rank.window=1.5"], ["rank.window"]),
    (["trainer.finetune_epochs=-1"], ["trainer.finetune_epochs", "-1"]),
    (["trainer.baseline_epochs=-2"], ["trainer.baseline_epochs"]),
    (["trainer.batch_size=0"], ["trainer.batch_size", ">= 1"]),
    (["freeze.period=0"], ["freeze.period", ">= 1"]),
    (["freeze.warmup=-1"], ["freeze.warmup"]),
    (["freeze.per_stage=0"], ["freeze.per_stage"]),
    (["freeze.final_fraction=1.5"], ["freeze.final_fraction"]),
    (["freeze.positions=[middle]"], ["middle", "first", "core", "last"]),
    (["freeze=alternating", "freeze.phases=[[first],[]]"], ["freeze.phases"]),
    (["model.name=resnt18"], ["model.name", "resnt18", "resnet18"]),
    (["dataset=imagenet"], ["dataset.root", "imagenet"]),
    (["dataset=cifar10"], ["dataset.root", "download"]),
    (["dataset.val_fraction=1.0"], ["dataset.val_fraction"]),
    (["dataset.num_classes=1"], ["dataset.num_classes=1", ">= 2"]),
    (["dataset.in_chans=0"], ["dataset.in_chans=0", ">= 1"]),
    (["bench.steps=0"], ["bench.steps"]),
    (["bench.rounds=0"], ["bench.rounds", "null", ">= 1"]),
    (["bench.switch_warmup=-1"], ["bench.switch_warmup", ">= 0"]),
    (["bench.probe_steps=-2"], ["bench.probe_steps", "-2", "0 (off)"]),
    (["model.checkpoint=/nonexistent/ckpt.pt"], ["model.checkpoint"]),
])
def test_validate_rejects_bad_values(cfg_factory, overrides, needles):
    from lrd_exp.tasks.checkpoint import check_model_checkpoint

    cfg = cfg_factory(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
        check_model_checkpoint(cfg)  # the checkpoint's contents are checked at the job's start
    message = str(info.value)
    assert "\n" not in message.strip(), "a user error is one line"
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("trainer,bench,expected", [
    ("32", None, ("32-true", "32-true")),
    ("bf16", "16", ("bf16-mixed", "16-mixed")),
    ("bf16-true", "bf16", ("bf16-true", "bf16-mixed")),
    ("64", "64-true", ("64-true", "64-true")),
])
def test_both_precision_keys_share_one_alias_table(cfg_factory, trainer, bench, expected):
    """``trainer.precision`` and ``bench.precision`` take the same flags and aliases (an int too), in long form."""
    from lrd_exp.config.schema import canonical_precision
    from lrd_exp.tasks.settings import bench_precision

    overrides = [f"trainer.precision={trainer}"] + ([f"bench.precision={bench}"] if bench else [])
    cfg = cfg_factory(overrides)
    validate(cfg)
    assert (canonical_precision(cfg.trainer.precision), bench_precision(cfg)) == expected


def test_bench_rounds_default_to_one_per_step_and_accept_an_integer(cfg_factory):
    cfg = cfg_factory([])
    assert cfg.bench.rounds is None and cfg.bench.switch_warmup == 0
    validate(cfg)
    validate(cfg_factory(["bench.rounds=12", "bench.switch_warmup=1"]))


def test_validate_accepts_existing_imagenet_root(cfg_factory, tmp_path):
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    validate(cfg_factory(["dataset=imagenet", f"dataset.root={root}"]))
    # the default root is <paths.data_dir>/imagenet
    (tmp_path / "data" / "imagenet").mkdir(parents=True)
    validate(cfg_factory(["dataset=imagenet"]))


def test_validate_accepts_benchmark_task_without_imagenet(cfg_factory):
    # throughput only: no dataset needed on disk
    validate(cfg_factory(["dataset=imagenet", "task=benchmark"]))


def test_a_bare_hydra_compose_of_conf_works_without_run_py(tmp_path):
    """The lightning-hydra-template way: compose conf/ in a fresh interpreter that never imported lrd_exp."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        f"with initialize_config_dir(config_dir={str(CONF_DIR)!r}, version_base='1.3'):\n"
        "    cfg = compose(config_name='config', overrides=['rank.policy=optimized', 'freeze=alternating'])\n"
        "print(cfg.rank.policy.value, cfg.freeze.schedule.value, cfg.rank.ratio)\n"
        "try:\n"
        "    with initialize_config_dir(config_dir=" + repr(str(CONF_DIR)) + ", version_base='1.3'):\n"
        "        compose(config_name='config', overrides=['rank.policy=bogus'])\n"
        "except Exception as exc:\n"
        "    print('refused', 'quantized' in str(exc.__cause__))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["optimized", "alternating", "2.0", "refused", "True"]


class _WritesAFileWhenUnpickled:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(cfg_factory, tmp_path):
    import torch

    marker = tmp_path / "the-file-ran-code"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _WritesAFileWhenUnpickled(str(marker))}, path)
    from lrd_exp.tasks.checkpoint import check_model_checkpoint, read_checkpoint

    with pytest.raises(ConfigError) as info:
        check_model_checkpoint(cfg_factory([f"model.checkpoint={path}"]))
    message = str(info.value)
    assert "model.checkpoint" in message and "model.trust_checkpoint=true" in message and "\n" not in message
    assert not marker.exists()
    # the explicit opt-in loads it (and so runs what it carries: only for files the user trusts)
    read_checkpoint(str(path), trust=True)
    assert marker.exists()


def test_a_lightning_checkpoint_loads_safely(cfg_factory, tmp_path):
    """What this project's training writes loads with weights_only=True: no opt-in needed for it."""
    import pytorch_lightning as pl
    import timm
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lrd_exp.tasks.checkpoint import check_model_checkpoint
    from lrd_exp.tasks.models import build_original
    from lrd_exp.training.classifier import Classifier

    torch.manual_seed(0)
    module = Classifier(timm.create_model("resnet18", num_classes=10, in_chans=1), 10,
                        optim={"name": "sgd", "lr": 0.01, "scheduler": "cosine"})
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt], limit_val_batches=0)
    data = TensorDataset(torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,)))
    trainer.fit(module, DataLoader(data, batch_size=4))
    cfg = cfg_factory([f"model.checkpoint={tmp_path / 'ckpt' / 'last.ckpt'}"])
    validate(cfg)
    check_model_checkpoint(cfg)
    model = build_original(cfg.model, num_classes=10, in_chans=1, image_size=32)
    for (name, a), b in zip(model.state_dict().items(), module.model.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ every numeric key, whatever the policy
NUMERIC_KEYS = [  # (override, key named in the error); the default policy (quantized) does not use window/step
    ("rank.ratio=1.0", "rank.ratio"),
    ("rank.energy=0", "rank.energy"),
    ("rank.multiple=0", "rank.multiple"),
    ("rank.window=-0.1", "rank.window"),
    ("rank.window=1.0", "rank.window"),
    ("rank.step=0", "rank.step"),
    ("rank.tolerance=-0.01", "rank.tolerance"),
    ("rank.calibration_images=0", "rank.calibration_images"),
    ("rank.check_images=-1", "rank.check_images"),
    ("rank.min_agreement=1.5", "rank.min_agreement"),
    ("rank.max_damage=-0.5", "rank.max_damage"),
    ("rank.damage_images=0", "rank.damage_images"),
    ("bench.batch_size=0", "bench.batch_size"),
    ("bench.warmup=-1", "bench.warmup"),
    ("bench.steps=0", "bench.steps"),
    ("bench.rounds=0", "bench.rounds"),
    ("bench.switch_warmup=-1", "bench.switch_warmup"),
    ("bench.min_time_s=-1", "bench.min_time_s"),
    ("bench.probe_steps=-1", "bench.probe_steps"),
    ("advise.steps=0", "advise.steps"),
    ("advise.warmup=-1", "advise.warmup"),
    ("advise.val_images=-1", "advise.val_images"),
    ("advise.max_error=0", "advise.max_error"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.finetune_epochs=-1", "trainer.finetune_epochs"),
    ("trainer.target_drop=-0.5", "trainer.target_drop"),
    ("trainer.distill.alpha=1.5", "trainer.distill.alpha"),
    ("trainer.distill.temperature=0", "trainer.distill.temperature"),
    ("device.devices=0", "device.devices"),
    ("device.num_nodes=0", "device.num_nodes"),
    ("rank.rank=0", "rank.rank"),
]


@pytest.mark.parametrize("override,key", NUMERIC_KEYS)
def test_every_numeric_key_is_range_checked_whatever_the_policy(cfg_factory, override, key):
    """One line naming the key and the bad value, for the default rank policy too (rank.window=-0.1 ran a whole
    job before, because it was checked only with policy=optimized)."""
    value = override.split("=", 1)[1]
    with pytest.raises(ConfigError) as info:
        validate(cfg_factory([override]))
    message = str(info.value)
    assert "\n" not in message and key in message and value in message, message


@pytest.mark.parametrize("override,needle", [
    ("rank.include=[no_such_layer]", "rank.include pattern 'no_such_layer'"),
    ("rank.exclude=[layer9.*]", "rank.exclude pattern 'layer9.*'"),
    ("rank.include=[layer1.0.conv]", "did you mean layer1.0.conv2, layer1.0.conv1"),
])
def test_a_selection_that_selects_nothing_stops_before_any_work(cfg_factory, tmp_path, override, needle):
    from lrd_exp import tasks

    with pytest.raises(ConfigError, match="matches no Linear / Conv2d layer") as info:
        tasks.run(cfg_factory(["trainer=smoke", override]))
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "result.json").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("override,needle", [
    ("objective.metric=train_speedupp", "objective.metric='train_speedupp' is not a column of the result row; "
                                        "did you mean train_speedup"),
    ("device.strategy=dpp", "device.strategy='dpp' is not allowed: did you mean ddp"),
    ("device.devices=[0,-1]", "device.devices=[0, -1] is not allowed"),
])
def test_free_string_keys_are_checked_before_any_work(cfg_factory, tmp_path, override, needle):
    from lrd_exp import tasks

    with pytest.raises(ConfigError) as info:
        tasks.run(cfg_factory(["trainer=smoke", override]))
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "result.json").exists() and not (tmp_path / "cache").exists()


def test_freezing_only_cores_of_a_model_without_kxk_convs_stops_before_any_work(cfg_factory, tmp_path):
    from lrd_exp import tasks

    with pytest.raises(ConfigError, match=r"freeze.positions=\[core\] selects no factor.*allowed here: first, last"):
        tasks.run(cfg_factory(["trainer=smoke", "model=vit_tiny_digits", "freeze=sequential",
                               "freeze.positions=[core]"]))
    assert not (tmp_path / "out" / "result.json").exists() and not (tmp_path / "cache").exists()


def test_a_freeze_schedule_whose_positions_select_no_factor_is_refused():
    from lrd_exp import FreezeSchedule
    from lrd_exp.freezing.factors import collect_factors

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    decompose_model(model, policy="ratio", ratio=4, skip_head=False)
    with pytest.raises(ValueError, match=r"freeze.positions=\['core'\] selects no factor.*first, last"):
        FreezeSchedule({"schedule": "sequential", "positions": ["core"]}, collect_factors(model))


def test_a_rank_mapping_key_that_matches_nothing_is_refused_by_the_library():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"rank\.rank pattern 'fc\*' matches no"):
        decompose_model(model, policy="fixed", rank={"fc*": 2})
    with pytest.raises(ValueError, match=r"rank\.rank\['0'\]=0 is not allowed: a rank must be an integer >= 1"):
        decompose_model(model, policy="fixed", rank={"0": 0})
    with pytest.warns(UserWarning, match="no layer was decomposed"):
        decompose_model(model, policy="fixed", rank={"0": 8})  # full rank: nothing shrinks


def test_a_job_that_decomposes_nothing_fails_with_the_reason(cfg_factory, tmp_path):
    from lrd_exp import tasks
    from lrd_exp.tasks.job import JobFailed

    with pytest.raises(JobFailed, match="no layer was decomposed"):
        tasks.run(cfg_factory(["trainer=smoke", "bench.enabled=false", "rank.multiple=4096"]))
    import json

    row = json.loads((tmp_path / "out" / "result.json").read_text())
    assert row["status"] == "failed" and "would not shrink it" in row["error"]


def test_decompose_model_defaults_are_the_configs(cfg_factory):
    """One default per key: the library's keywords default to the rank node of the default config."""
    import inspect

    from lrd_exp.config.schema import enum_value

    cfg = cfg_factory([])
    params = inspect.signature(decompose_model).parameters
    for key, value in OmegaConf.to_container(cfg.rank, resolve=True).items():
        default = params[key].default
        assert enum_value(value) == (list(default) if isinstance(default, tuple) else default), key
    a = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    b = copy.deepcopy(a)
    decompose_model(a)
    decompose_model(b, **cfg.rank)
    assert isinstance(a[0], FactorizedLayer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_freeze_defaults_have_one_source(cfg_factory):
    """One default per key: a freeze mapping that leaves keys out means the schema's FreezeConfig, which is also
    what ``freeze=sequential`` composes to (the YAML sets only the schedule)."""
    from dataclasses import asdict

    from lrd_exp.config.schema import FreezeConfig
    from lrd_exp.config.validate import FREEZE_DEFAULTS, freeze_values

    schema = {k: getattr(v, "value", v) for k, v in asdict(FreezeConfig()).items()}
    assert FREEZE_DEFAULTS == schema
    assert freeze_values({}) == schema
    composed = OmegaConf.to_container(cfg_factory(["freeze=sequential"]).freeze, resolve=True)
    assert {k: getattr(v, "value", v) for k, v in composed.items()} == schema
    assert freeze_values({"schedule": "none", "warmup": 0})["schedule"] == "none"


@pytest.mark.parametrize("override", ["rank.policy=quantized", "rank.base=energy", "rank.ratio=1",
                                      "rank.multiple=0", "rank.window=1.5", "rank.step=0", "rank.tolerance=-1",
                                      "rank.policy=fixed", "rank.calibration_images=0", "rank.check_images=-1",
                                      "rank.min_agreement=-0.1", "rank.damage_images=0",
                                      "rank.budget_by=time"])
@pytest.mark.filterwarnings("ignore:decompose_model. no layer was decomposed")
def test_rank_rules_give_one_verdict_through_both_paths(cfg_factory, override):
    """``run.py``'s validation and ``decompose_model(**cfg.rank)`` run the same rules (config.values)."""
    from lrd_exp.config.values import check_rank_keys

    cfg = cfg_factory([override])
    try:
        check_rank_keys(**cfg.rank)
        cli = None
    except ValueError as exc:
        cli = str(exc)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    try:
        decompose_model(model, **cfg.rank)
        library = None
    except ValueError as exc:
        library = str(exc)
    assert cli == library
    if cli is not None:
        with pytest.raises(ConfigError, match=re.escape(cli)):
            validate(cfg)


@pytest.mark.parametrize("override", ["freeze=sequential", "freeze.period=0", "freeze.warmup=-1",
                                      "freeze.per_stage=0", "freeze.final_fraction=1.5", "freeze.positions=[]",
                                      "freeze=alternating", "freeze.phases=[]"])
def test_freeze_rules_give_one_verdict_through_both_paths(cfg_factory, override):
    """``run.py``'s validation and the library's ``FreezeSchedule(cfg.freeze, factors)`` run the same rules."""
    from lrd_exp import FreezeSchedule
    from lrd_exp.freezing.factors import collect_factors

    cfg = cfg_factory([override])
    try:
        validate(cfg)
        cli = None
    except ConfigError as exc:
        cli = str(exc)
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    decompose_model(model, policy="ratio", ratio=2, skip_stem=False, skip_head=False)
    try:
        FreezeSchedule(cfg.freeze, collect_factors(model))
        library = None
    except ValueError as exc:
        library = str(exc)
    assert cli == library


def test_rank_defaults_have_one_source():
    """RankSettings holds every rank default: the Hydra schema, decompose_model's keywords and the YAML agree."""
    import inspect
    from dataclasses import fields

    from lrd_exp.config.rank_settings import DEFAULTS, RankSettings
    from lrd_exp.config.schema import RankConfig, enum_value

    schema = OmegaConf.to_container(OmegaConf.structured(RankConfig))
    params = inspect.signature(decompose_model).parameters
    yaml_rank = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").rank)
    assert {f.name for f in fields(RankSettings)} == set(schema) == set(yaml_rank)
    for f in fields(RankSettings):
        default = getattr(DEFAULTS, f.name)
        expected = list(default) if isinstance(default, tuple) else default
        assert enum_value(schema[f.name]) == expected, f.name
        assert params[f.name].default == default, f.name
        assert enum_value(yaml_rank[f.name]) == expected, f.name


def test_rank_settings_are_checked_once_and_frozen():
    from dataclasses import FrozenInstanceError

    from lrd_exp.config.rank_settings import RankSettings

    s = RankSettings.from_keys(policy="energy", energy=0.9, include="layer4.*")
    assert s.include == ("layer4.*",) and s.resolved(calibration=True).fit == "activations"
    assert s.resolved(calibration=False).fit == "weights"
    with pytest.raises(FrozenInstanceError):
        s.ratio = 3.0
    with pytest.raises(ValueError, match=r"rank.energy=1.5"):
        RankSettings.from_keys(policy="energy", energy=1.5)
    with pytest.raises(TypeError, match="ratioo"):
        RankSettings.from_keys(ratioo=2)
    with pytest.raises(ValueError, match="needs calibration"):
        RankSettings.from_keys(fit="activations").resolved(calibration=False)


@pytest.mark.parametrize("keys,needle", [({"skip_stem": "false"}, "rank.skip_stem='false'"),
                                         ({"recalibrate_bn": 1}, "rank.recalibrate_bn=1"),
                                         ({"include": 3}, "rank.include=3"),
                                         ({"exclude": ["fc", 2]}, "rank.exclude=")])
def test_rank_settings_refuse_loose_bools_and_patterns(keys, needle):
    from lrd_exp.config.rank_settings import RankSettings

    with pytest.raises(ValueError) as exc:
        RankSettings.from_keys(**keys)
    assert str(exc.value).startswith(needle) and "\n" not in str(exc.value)
