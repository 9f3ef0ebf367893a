"""``task=advise``: a small grid end to end, the frontier, the recommendation and the grid's errors."""

from __future__ import annotations

import copy
import importlib
import math
import shlex

import pandas as pd
import pytest
import torch
from conftest import run_cli

from lrd_exp.config import grid
from lrd_exp.config.validate import ConfigError, validate
from lrd_exp.freezing.schedule import FreezeState
from lrd_exp.results.pareto import pareto_mask, recommend
from lrd_exp.tasks.advise import group_by_decomposition, union_states

# a timm test model on synthetic data: seconds per configuration on one CPU thread
TINY = ["task=advise", "model.name=test_resnet", "dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=10",
        "dataset.train_size=64", "dataset.val_size=32", "device=cpu", "logger=csv", "trainer.batch_size=8",
        "advise.steps=2", "advise.warmup=0", "bench.latency=true", "bench.memory=true", "bench.deploy=true",
        "~advise.grid.rank.allocation"]  # synthetic data: the global family is left out anyway (test below)
GRID = ["advise.grid.rank.ratio=[2,4]", "advise.grid.rank.policy=[quantized]", "advise.grid.rank.multiple=[8,16]",
        "advise.grid.freeze.schedule=[none,sequential]"]


def dominated(row: pd.Series, table: pd.DataFrame, speed: str) -> bool:
    at_least = (table[speed] >= row[speed]) & (table["approx_error"] <= row["approx_error"])
    better = (table[speed] > row[speed]) | (table["approx_error"] < row["approx_error"])
    return bool((at_least & better).any())


def test_a_small_grid_end_to_end_marks_only_non_dominated_rows(cfg_factory, single_thread, tmp_path):
    """The user's own weights (model.checkpoint), a 2 x 1 x 2 x 2 grid: every configuration measured, the frontier
    exactly the non-dominated rows, the proxy and the size ratios those of a fresh decomposition of those weights."""
    from lrd_exp import decompose_model
    from lrd_exp.tasks import run
    from lrd_exp.tasks.models import build_original

    shape = {"num_classes": 10, "in_chans": 3, "image_size": 32}
    weights = build_original(cfg_factory(TINY).model, **shape).state_dict()
    torch.save(weights, tmp_path / "weights.pt")
    cfg = cfg_factory([*TINY, *GRID, f"model.checkpoint={tmp_path / 'weights.pt'}"])
    run(cfg)
    out = cfg.paths.output_dir
    table = pd.read_csv(f"{out}/advice.csv")
    assert len(table) == 1 + 8  # the original (reference) and every configuration of the 2 x 1 x 2 x 2 grid
    assert (table["status"] == "ok").all()
    assert table["configuration"].iloc[0] == "original" and table["train_speedup"].iloc[0] == 1.0
    configs = table.iloc[1:]
    assert sorted(zip(configs["rank.ratio"], configs["rank.multiple"], configs["freeze.schedule"])) == sorted(
        (r, m, f) for r in (2, 4) for m in (8, 16) for f in ("none", "sequential"))
    for col in ("params_ratio", "flops_ratio", "train_speedup", "infer_speedup_deployed", "train_mem_mb",
                "latency_ms", "latency_ms_p90", "approx_error"):
        assert configs[col].notna().all() and (configs[col] > 0).all(), col
    assert table["top1_pre"].isna().all()  # synthetic data: no top-1

    # the frontier: exactly the rows no other row dominates
    for _, row in table.iterrows():
        assert bool(row["frontier"]) == (not dominated(row, table, "train_speedup")), row["configuration"]
    rec = table[table["recommended"]]
    assert len(rec) <= 1
    if len(rec):
        assert bool(rec["frontier"].iloc[0]) and rec["train_speedup"].iloc[0] > 1
        command = open(f"{out}/advice.md").read()
        r = rec.iloc[0]
        want = f"rank.ratio={r['rank.ratio']:g} rank.policy=quantized rank.multiple={r['rank.multiple']:g} " \
               f"freeze.schedule={r['freeze.schedule']}"
        assert want in command
    assert (table.loc[table["frontier"], "configuration"] == "original").any()  # error 0: nothing beats it there

    # numbers a second decomposition reproduces: the proxy, the parameter ratio, the schedules' shared layers
    x = torch.randn(1, 3, 32, 32)
    for (ratio, multiple), rows in configs.groupby(["rank.ratio", "rank.multiple"]):
        original = build_original(cfg.model, **shape)  # loads model.checkpoint
        assert all(torch.equal(v, weights[k]) for k, v in original.state_dict().items())
        model = copy.deepcopy(original)
        report = decompose_model(model, **grid.apply(cfg, {"rank.ratio": float(ratio), "rank.multiple": int(multiple)}
                                                     ).rank, example_input=x)
        assert rows["approx_error"].tolist() == pytest.approx([report.approx_error] * 2, rel=1e-6)
        n = sum(p.numel() for p in original.parameters()) / sum(p.numel() for p in model.parameters())
        assert rows["params_ratio"].tolist() == pytest.approx([n] * 2, rel=1e-9)
        assert rows["infer_speedup_deployed"].nunique() == 1  # one decomposition, timed once for both schedules
    assert (configs.groupby("rank.ratio")["approx_error"].mean().diff().dropna() > 0).all()  # more compression
    assert open(f"{out}/advice_frontier.png", "rb").read(8).startswith(b"\x89PNG")


def test_configurations_with_the_same_ranks_are_measured_once(cfg_factory, single_thread, caplog):
    """rank.policy=ratio ignores rank.multiple: its two configurations are one decomposition, timed once."""
    from lrd_exp.tasks import run

    cfg = cfg_factory([*TINY, "advise.grid.rank.ratio=[2]", "advise.grid.rank.policy=[ratio]",
                       "advise.grid.rank.multiple=[8,16]", "advise.grid.freeze.schedule=[none]"])
    with caplog.at_level("INFO", logger="lrd_exp"):
        run(cfg)
    table = pd.read_csv(f"{cfg.paths.output_dir}/advice.csv")
    assert "same ranks as an earlier configuration" in caplog.text
    first, second = table.iloc[1], table.iloc[2]
    assert (first["rank.multiple"], second["rank.multiple"]) == (8, 16)
    assert (first["configuration"], second["configuration"]) == (
        "ratio=2 policy=ratio multiple=8 schedule=none", "ratio=2 policy=ratio multiple=16 schedule=none")
    for col in ("params_ratio", "approx_error", "train_speedup", "infer_speedup_deployed", "latency_ms"):
        assert first[col] == second[col], col


def test_each_decomposition_is_timed_once_for_all_its_schedules(cfg_factory, single_thread, monkeypatch):
    """Two schedules of one decomposition: one side-by-side comparison holding the union of their states."""
    advise_module = importlib.import_module("lrd_exp.tasks.advise")  # the package exports a function of that name
    from lrd_exp.devices import resolve_device

    calls = []
    real = advise_module.compare_states

    def spy(original, decomposed, states, *args, **kwargs):
        calls.append([sorted(s.frozen) for s in states])
        return real(original, decomposed, states, *args, **kwargs)

    monkeypatch.setattr(advise_module, "compare_states", spy)
    cfg = cfg_factory([*TINY, "advise.grid.rank.ratio=[2]", "advise.grid.rank.policy=[quantized]",
                       "advise.grid.rank.multiple=[8]", "advise.grid.freeze.schedule=[none,sequential]",
                       "bench.deploy=false", "bench.latency=false", "bench.memory=false"])
    advise_module.advise(cfg, resolve_device("cpu"), cfg.paths.output_dir)
    assert len(calls) == 1
    states = calls[0]
    assert states[0] == [] and len(states) == len({tuple(s) for s in states}) > 1  # all trainable first, no repeats


def test_a_labelled_dataset_gives_top1_before_fine_tuning(cfg_factory, single_thread):
    """digits: the training job's baseline (trained here, briefly), then each decomposition's top-1 untrained."""
    from lrd_exp.tasks import run

    cfg = cfg_factory(["task=advise", "trainer=smoke", "device=cpu", "logger=csv", "advise.steps=1",
                       "advise.warmup=0", "advise.val_images=64", "bench.batch_size=4", "bench.memory=false",
                       "bench.latency=false", "bench.deploy=false", "advise.grid.rank.ratio=[2,8]",
                       "advise.grid.rank.policy=[quantized]", "advise.grid.rank.multiple=[8]",
                       "advise.grid.freeze.schedule=[none]"])
    run(cfg)
    table = pd.read_csv(f"{cfg.paths.output_dir}/advice.csv")
    assert table["top1_pre"].notna().all()
    assert table["top1_pre"].between(0, 100).all()
    # 64 images: every top-1 is a multiple of 100/64 points
    assert all(math.isclose(v * 64 / 100, round(v * 64 / 100), abs_tol=1e-6) for v in table["top1_pre"])
    assert "first 64 validation images" in open(f"{cfg.paths.output_dir}/advice.md").read()
    # the training job's end-to-end check, on held-out training images: the original agrees with itself
    assert table["agreement"].iloc[0] == 1.0 and table["agreement"].iloc[1:].between(0, 1).all()
    assert (table["check_kl"].iloc[1:] >= 0).all() and (table["check_error"].iloc[1:] > 0).all()


def test_a_grid_where_every_configuration_collapses_says_so_and_recommends_none(cfg_factory):
    from lrd_exp.tasks.advice_report import advice_table, collapse_note

    cfg = cfg_factory(["task=advise", "advise.grid.rank.ratio=[2,8]", "advise.grid.rank.policy=[quantized]",
                       "advise.grid.rank.multiple=[8]", "advise.grid.freeze.schedule=[none]",
                       "~advise.grid.rank.allocation"])
    rows = [{"rank.ratio": r, "rank.policy": "quantized", "rank.multiple": 8, "freeze.schedule": "none",
             "configuration": f"ratio={r}", "train_speedup": s, "approx_error": e, "agreement": a, "status": "ok"}
            for r, s, e, a in ((2, 1.5, 0.2, 0.3), (8, 2.5, 0.5, 0.1))]
    table = advice_table(cfg, rows, {}, None)
    assert not table["recommended"].any()  # both are faster, on the frontier, and destroyed
    note = collapse_note(cfg, table)
    assert "No configuration in this grid stays within the end-to-end check" in note and "30.0%" in note
    rows[0]["agreement"] = 0.8
    table = advice_table(cfg, rows, {}, None)
    assert collapse_note(cfg, table) is None
    assert table.loc[table["recommended"], "configuration"].tolist() == ["ratio=2"]


# ------------------------------------------------------------------------------------------- the frontier
def test_pareto_mask_keeps_exactly_the_non_dominated_rows():
    df = pd.DataFrame({"speed": [1.0, 1.5, 1.4, 2.0, 2.0, 1.2, math.nan],
                       "error": [0.0, 0.3, 0.4, 0.6, 0.6, 0.1, 0.0]})
    # 1.4 @ 0.4 is dominated by 1.5 @ 0.3; the two equal rows (2.0 @ 0.6) tie and both stay; NaN never counts
    assert pareto_mask(df, "speed", "error").tolist() == [True, True, False, True, True, True, False]


def test_recommend_takes_the_knee_or_the_fastest_under_a_bound():
    df = pd.DataFrame({"speed": [1.0, 1.6, 1.7, 1.75, 0.9], "error": [0.0, 0.2, 0.5, 0.9, 0.1]})
    candidates = pd.Series([False, True, True, True, True])
    # scaled over the frontier: 1.6 @ 0.2 gains the most speed per error
    assert recommend(df, "speed", "error", candidates=candidates) == 1
    assert recommend(df, "speed", "error", candidates=candidates, max_error=0.6) == 2
    assert recommend(df, "speed", "error", candidates=candidates, max_error=0.05) is None
    assert recommend(df[[True, False, False, False, True]], "speed", "error",
                     candidates=candidates[[True, False, False, False, True]]) is None  # 0.9x: dominated


# ------------------------------------------------------------------------------------------- the grid
def test_union_states_times_each_frozen_set_once_and_keeps_each_schedules_weights():
    none = [FreezeState(1.0, [], "epoch>=0")]
    seq = [FreezeState(0.25, [], "epoch>=0"), FreezeState(0.25, ["a"], "epoch>=1"), FreezeState(0.5, ["a", "b"], "x")]
    union, plans = union_states([none, seq])
    assert [s.frozen for s in union] == [[], ["a"], ["a", "b"]]
    assert plans == [[(0, 1.0)], [(0, 0.25), (1, 0.25), (2, 0.5)]]


def test_synthetic_data_leaves_the_global_family_out_with_a_note():
    """rank.allocation=global measures damage on real calibration images: on synthetic data those configurations
    are dropped (and said so), the uniform ones stay."""
    from types import SimpleNamespace

    from lrd_exp.tasks.advise import measurable

    configs = grid.expand({"rank": {"ratio": [2, 4], "allocation": ["uniform", "global"]}})
    kept, note = measurable(configs, SimpleNamespace(has_real_data=False, name="synthetic"))
    assert [c["rank.allocation"] for c in kept] == ["uniform", "uniform"] and "2 configuration(s)" in note
    assert measurable(configs, SimpleNamespace(has_real_data=True, name="digits")) == (configs, "")


def test_group_by_decomposition_shares_the_rank_keys():
    configs = grid.expand({"rank": {"ratio": [2, 4]}, "freeze": {"schedule": ["none", "sequential"]}})
    assert [[c["freeze.schedule"] for c in g] for g in group_by_decomposition(configs)] == [["none", "sequential"]] * 2


def test_grid_expands_in_order_and_names_bad_keys_and_values(cfg_factory):
    cfg = cfg_factory(["task=advise"])
    configs = grid.expand(cfg.advise.grid, cfg)
    assert len(configs) == 4 * 2 * 2 * 2 * 2  # the grid's product
    assert configs[0] == {"rank.ratio": 1.5, "rank.policy": "quantized", "rank.multiple": 8,
                          "rank.allocation": "uniform", "freeze.schedule": "none"}
    # the documented default: optimized at multiple 64 and optimized with a global allocation left out (4 ratios x
    # {quantized 8, quantized 64} x {uniform, global} + optimized 8 uniform, x 2 schedules)
    kept = grid.expand(cfg.advise.grid, cfg, exclude=cfg.advise.exclude)
    assert len(kept) == 4 * 5 * 2
    assert not any(c["rank.policy"] == "optimized" and c["rank.multiple"] == 64 for c in kept)
    assert not any(c["rank.policy"] == "optimized" and c["rank.allocation"] == "global" for c in kept)
    assert sum(c["rank.allocation"] == "global" for c in kept) == 16
    # a rule on a key that is not an axis compares the run's own value
    narrowed = cfg_factory(["task=advise", "~advise.grid.rank.multiple", "rank.multiple=64"])
    assert len(grid.expand(narrowed.advise.grid, narrowed, exclude=narrowed.advise.exclude)) == 16
    with pytest.raises(ConfigError, match=r"advise.exclude\[0\]: rank.bogus is not allowed"):
        grid.expand(cfg.advise.grid, cfg, exclude=[{"rank": {"bogus": 1}}])
    assert grid.expand({"rank": {"ratio": 3}}) == [{"rank.ratio": 3}]  # a scalar is a one-value axis
    assert grid.overrides({"rank.ratio": 2.0, "freeze.schedule": "none"}) == ["rank.ratio=2", "freeze.schedule=none"]
    with pytest.raises(ConfigError, match=r"advise.grid.trainer is not allowed"):
        grid.expand({"trainer": {"lr": [1]}}, cfg)
    with pytest.raises(ConfigError, match=r"advise.grid.rank.ratoi is not allowed: rank has no key 'ratoi'"):
        grid.expand({"rank": {"ratoi": [2]}}, cfg)
    with pytest.raises(ConfigError, match=r"rank.ratio=0.5 is not allowed"):
        grid.apply(cfg, {"rank.ratio": 0.5})
    with pytest.raises(ConfigError, match=r"advise.grid.rank.policy='fast' is not allowed"):
        grid.apply(cfg, {"rank.policy": "fast"})
    with pytest.raises(ConfigError, match=r"advise.grid.rank.ratio=\[\] is not allowed"):
        grid.expand({"rank": {"ratio": []}})


def test_advise_settings_are_checked_before_any_work(cfg_factory, tmp_path):
    with pytest.raises(ConfigError, match="advise.steps=0"):
        validate(cfg_factory(["task=advise", "advise.steps=0"]))
    with pytest.raises(ConfigError, match="advise.max_error=-1"):
        validate(cfg_factory(["task=advise", "advise.max_error=-1"]))
    from lrd_exp import decompose_model, save_decomposed
    from lrd_exp.tasks.models import build_original

    cfg = cfg_factory(["task=advise"])
    model = build_original(cfg.model, num_classes=10, in_chans=1, image_size=32)
    decompose_model(model, policy="quantized", ratio=2.0, input_size=(1, 32, 32))
    path = tmp_path / "model.pt"
    save_decomposed(model, path, model_name="resnet18", model_kwargs={"num_classes": 10, "in_chans": 1})
    from lrd_exp.tasks.checkpoint import check_model_checkpoint

    with pytest.raises(ConfigError, match="is a decomposed model"):
        check_model_checkpoint(cfg_factory(["task=advise", f"model.checkpoint={path}"]))


def test_a_bad_grid_value_is_one_line_and_exit_2(tmp_path):
    proc = run_cli(["task=advise", "advise.grid.rank.ratio=[0.5,2]", f"hydra.run.dir={tmp_path / 'run'}"],
                   timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: advise.grid: rank.ratio=0.5 is not allowed: the compression ratio must be a number > 1"]
    assert not (tmp_path / "run" / "advice.csv").exists()


def test_a_failing_configuration_is_kept_with_its_error_and_the_run_fails(cfg_factory, single_thread, monkeypatch):
    step = importlib.import_module("lrd_exp.tasks.decomposition")  # the tasks' one decomposition step
    from lrd_exp.tasks import JobFailed, run

    real = step.decompose_model

    def flaky(model, **kw):
        if kw["ratio"] == 4:
            raise RuntimeError("no memory left for ratio 4")
        return real(model, **kw)

    monkeypatch.setattr(step, "decompose_model", flaky)
    cfg = cfg_factory([*TINY, "advise.grid.rank.ratio=[2,4]", "advise.grid.rank.policy=[quantized]",
                       "advise.grid.rank.multiple=[8]", "advise.grid.freeze.schedule=[none]"])
    with pytest.raises(JobFailed, match=r"1 of 2 configuration\(s\) failed .*no memory left for ratio 4"):
        run(cfg)
    table = pd.read_csv(f"{cfg.paths.output_dir}/advice.csv")
    assert table["status"].tolist() == ["ok", "ok", "failed"]  # the original, ratio 2, ratio 4: nothing lost
    assert "RuntimeError: no memory left for ratio 4" in table["error"].iloc[2]
    assert not table["frontier"].iloc[2]

    monkeypatch.setattr(step, "decompose_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad")))
    cfg = cfg_factory([*TINY, "advise.grid.rank.ratio=[2]", "advise.grid.rank.policy=[quantized]",
                       "advise.grid.rank.multiple=[8]", "advise.grid.freeze.schedule=[none]",
                       "paths.output_dir=" + str(cfg.paths.output_dir) + "_2"])
    with pytest.raises(JobFailed, match=r"^1 of 1 configuration\(s\) failed .*ValueError: bad"):
        run(cfg)


def test_an_empty_grid_advises_on_the_runs_own_configuration_by_inference_speed(cfg_factory, single_thread):
    """An empty grid (~advise.grid.rank ~advise.grid.freeze): one configuration, the run's rank / freeze config;
    advise.speed=infer without the deployed form ranks by the factored form's inference speed."""
    from lrd_exp.tasks import run

    cfg = cfg_factory([*TINY, "~advise.grid.rank", "~advise.grid.freeze", "advise.speed=infer", "bench.deploy=false",
                       "rank.ratio=3"])
    run(cfg)
    table = pd.read_csv(f"{cfg.paths.output_dir}/advice.csv")
    assert table["configuration"].tolist() == ["original", "as configured"]
    assert table["infer_speedup_deployed"].isna().all() and table["infer_speedup"].notna().all()
    for _, row in table.iterrows():
        assert bool(row["frontier"]) == (not dominated(row, table, "infer_speedup"))
    assert "latency_ms is the factored form's" in open(f"{cfg.paths.output_dir}/advice.md").read()


def test_the_recommended_command_composes_to_the_advised_configuration(cfg_factory, monkeypatch):
    """The command's overrides, composed by Hydra, give the same rank and freeze config as the advised row, with
    the run's own overrides kept, the advise keys dropped, and a sweep job's choices made a single run."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    import lrd_exp.tasks.advice_report as advice

    own = ["task=advise", "model=resnet50", "dataset=synthetic", "dataset.image_size=64", "rank.ratio=3",
           "advise.grid.rank.ratio=[2,4]", "+advise.grid.freeze.positions=[[first],[first,last]]", "seed=1"]
    cfg = cfg_factory([o for o in own])
    hydra = SimpleNamespace(overrides=SimpleNamespace(task=own), mode=RunMode.MULTIRUN)
    monkeypatch.setattr(advice.HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(advice.HydraConfig, "get", staticmethod(lambda: hydra))
    config = {"rank.ratio": 4, "rank.policy": "optimized", "rank.multiple": 64, "rank.allocation": "uniform",
              "freeze.schedule": "sequential", "freeze.positions": ["first", "last"]}
    command = advice.recommended_command(cfg, pd.Series(config))
    args = shlex.split(command)
    assert args[:2] == ["python", "run.py"]
    assert "task=train" in args and "hydra.mode=RUN" in args and "trainer.baseline_epochs=0" in args
    assert not any(a.startswith(("advise.", "+advise.", "task=advise", "rank.ratio=3")) for a in args)
    composed = cfg_factory([a for a in args[2:] if not a.startswith("hydra.")])
    want = grid.apply(cfg, config)
    assert composed.task.value == "train" and composed.model.name == "resnet50" and composed.seed == 1
    assert composed.rank == want.rank and composed.freeze == want.freeze
    assert composed.trainer.baseline_epochs == 0  # synthetic data: the advised weights are the model as built


def test_a_configuration_that_decomposes_nothing_is_the_original_not_a_candidate(cfg_factory, single_thread):
    """test_vit's layers are narrower than 64: at multiple 64 every rank rounds to a kept layer. That row is the
    original itself: listed as unchanged, not timed, never on the frontier or recommended."""
    from lrd_exp.tasks import run

    cfg = cfg_factory([*TINY, "model.name=test_vit", "advise.grid.rank.ratio=[2]",
                       "advise.grid.rank.policy=[quantized]", "advise.grid.rank.multiple=[8,64]",
                       "advise.grid.freeze.schedule=[none]", "rank.rounding=up"])
    run(cfg)
    table = pd.read_csv(f"{cfg.paths.output_dir}/advice.csv").set_index("rank.multiple", drop=False)
    assert table.loc[64, "status"] == "unchanged" and table.loc[64, "layers_decomposed"] == 0
    assert pd.isna(table.loc[64, "train_speedup"]) and not table.loc[64, "frontier"]
    assert not table.loc[64, "recommended"]
    assert table.loc[8, "status"] == "ok" and table.loc[8, "layers_decomposed"] > 0


def test_an_interrupted_grid_keeps_what_it_measured(cfg_factory, single_thread, monkeypatch):
    from lrd_exp.devices import resolve_device

    advise_module = importlib.import_module("lrd_exp.tasks.advise")
    step = importlib.import_module("lrd_exp.tasks.decomposition")  # the tasks' one decomposition step
    real = step.decompose_model

    def interrupted(model, **kw):
        if kw["ratio"] == 4:
            raise KeyboardInterrupt
        return real(model, **kw)

    monkeypatch.setattr(step, "decompose_model", interrupted)
    cfg = cfg_factory([*TINY, "advise.grid.rank.ratio=[2,4]", "advise.grid.rank.policy=[quantized]",
                       "advise.grid.rank.multiple=[8]", "advise.grid.freeze.schedule=[none,sequential]"])
    with pytest.raises(KeyboardInterrupt):
        advise_module.advise(cfg, resolve_device("cpu"), cfg.paths.output_dir)
    table = pd.read_csv(f"{cfg.paths.output_dir}/advice.csv")
    assert table["configuration"].tolist() == ["original", "ratio=2 policy=quantized multiple=8 schedule=none",
                                               "ratio=2 policy=quantized multiple=8 schedule=sequential"]
    assert (table["status"] == "ok").all() and table["train_speedup"].notna().all()
