"""Result rows, atomic writes, sweep aggregation, tables, the W&B offline table and the Hydra callback."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from lrd_exp import results as R
from lrd_exp.sweep.callbacks import AggregateResults


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B offline and out of the home directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / sub))
    return tmp_path


def _row(i: int, model: str = "resnet18", **kw) -> dict:
    base = dict(
        model=model,
        dataset="digits",
        rank_policy=["none", "ratio", "quantized"][i % 3],
        rank_ratio=[None, 2.0, 2.0][i % 3],
        rank_multiple=[None, None, 8][i % 3],
        rank_params={"policy": ["none", "ratio", "quantized"][i % 3], "ratio": 2.0},
        freeze="sequential" if i % 2 else "none",
        device="cpu",
        device_name="Test CPU",
        git_commit="abcdef1234567",
        overrides=[f"job={i}"],
        time=f"2026-01-0{i + 1}T10:00:00",
        params_original=1000,
        params_decomposed=500 + 10 * i,
        train_ips_original=100.0,
        train_ips_decomposed=120.0 + i,
        infer_ips_original=200.0,
        infer_ips_decomposed=250.0,
        top1_original=90.0,
        top1_decomposed=88.5,
        status="ok",
    )
    base.update(kw)
    return base


# --------------------------------------------------------------------------------------------- rows


def test_columns_contract():
    cols = R.RESULT_COLUMNS
    assert len(cols) == len(set(cols))
    assert cols[:3] == ["model", "dataset", "task"]
    assert cols[-3:] == ["status", "error", "duration_s"]
    for c in ("rank_params", "freeze_params", "overrides", "baseline_cache_hit", "flops_speedup_infer",
              "train_ips_decomposed_max", "top1_drop", "train_flops_decomposed", "variant", "channels_last",
              "train_ips_logged", "train_ips_fidelity", "train_loop_overhead", "train_ips_probe",
              "train_ips_fidelity_paired", "infer_ips_deployed", "layers_merged", "train_mem_mb_original",
              "train_mem_mb_decomposed", "train_mem_kind", "latency_ms_deployed_p90"):
        assert c in cols


def test_make_row_fills_and_derives():
    row = R.make_row(
        model="vit_tiny",
        params_original=1_000_000,
        params_decomposed=400_000,
        flops_original=2e9,
        flops_decomposed=1e9,
        train_flops_original=6e9,
        train_flops_decomposed=2.5e9,
        train_ips_original=100.0,
        train_ips_decomposed=160.0,
        infer_ips_original=200.0,
        infer_ips_decomposed=274.0,
        top1_original=91.25,
        top1_decomposed=90.0,
        rank_params={"policy": "quantized", "ratio": 2.0, "multiple": 8},
        overrides=["rank.policy=quantized", "freeze=sequential"],
        my_extra=3,
    )
    assert list(row)[: len(R.RESULT_COLUMNS)] == R.RESULT_COLUMNS
    assert list(row)[-1] == "my_extra" and row["my_extra"] == 3
    assert row["dataset"] is None and row["status"] is None
    assert row["params_ratio"] == pytest.approx(2.5)
    assert row["flops_speedup_infer"] == pytest.approx(2.0)
    assert row["flops_speedup_train"] == pytest.approx(2.4)
    assert row["train_speedup"] == pytest.approx(1.6)
    assert row["infer_speedup"] == pytest.approx(1.37)
    assert row["top1_drop"] == pytest.approx(1.25)
    assert json.loads(row["rank_params"]) == {"policy": "quantized", "ratio": 2.0, "multiple": 8}
    assert row["overrides"] == "rank.policy=quantized freeze=sequential"


def test_make_row_keeps_given_and_skips_bad_inputs():
    row = R.make_row(train_ips_original=0.0, train_ips_decomposed=5.0, params_original=float("nan"),
                     params_decomposed=10, infer_speedup=9.9, top1_original=80.0)
    assert row["train_speedup"] is None  # division by zero -> missing, not inf
    assert row["params_original"] is None and row["params_ratio"] is None
    assert row["infer_speedup"] == 9.9  # given values win
    assert row["top1_drop"] is None
    assert R.is_complete({"status": "ok"})
    assert not R.is_complete({"status": "failed"}) and not R.is_complete({"status": "running"})
    assert not R.is_complete(None) and not R.is_complete({})


def test_write_and_read_result(tmp_path):
    import numpy as np

    path = R.write_result(tmp_path / "job", _row(1, params_decomposed=np.int64(250), top1_decomposed_pre=float("nan"),
                                                 duration_s=np.float32(1.5)))
    assert path == tmp_path / "job" / "result.json"
    text = path.read_text()
    assert "NaN" not in text
    row = R.read_result(path)
    assert row["params_ratio"] == pytest.approx(4.0) and row["top1_decomposed_pre"] is None
    assert row["duration_s"] == pytest.approx(1.5)
    assert R.read_result(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text('{"model": "x", "params_')
    assert R.read_result(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1, 2]")
    assert R.read_result(tmp_path / "list.json") is None


# --------------------------------------------------------------------------------------- atomic I/O


def test_atomic_json_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    R.write_json_atomic(target, {"status": "ok", "v": 1})

    def boom(*a, **k):
        raise OSError("killed before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="killed"):
        R.write_json_atomic(target, {"status": "ok", "v": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"status": "ok", "v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left behind


def test_atomic_text_keeps_old_file_when_write_fails_midway(tmp_path, monkeypatch):
    target = tmp_path / "results.md"
    R.write_text_atomic(target, "old table\n")
    real_fsync = os.fsync
    calls = []

    def half_written(fd):  # the data is partly in the temp file when the "kill" happens
        calls.append(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", half_written)
    with pytest.raises(KeyboardInterrupt):
        R.write_text_atomic(target, "new table that never lands\n" * 100)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert calls and target.read_text() == "old table\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]

    class Unserialisable:
        def __repr__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError, match="cannot serialise"):
        R.write_json_atomic(target, {"x": Unserialisable()})
    assert target.read_text() == "old table\n"


# ----------------------------------------------------------------------------------------- collect


def _make_sweep(root: Path) -> Path:
    sweep = root / "multirun" / "2026-01-01" / "10-00-00"
    for i in range(3):
        R.write_result(sweep / str(i), _row(i, output_dir=str(sweep / str(i))))
    # corrupt (killed mid-write by a non-atomic writer)
    (sweep / "3").mkdir()
    (sweep / "3" / "result.json").write_text('{"model": "resnet18", "stat')
    # nested duplicate of job 1 (e.g. a copied job folder), older and failed: must collapse into one row
    R.write_result(sweep / "1" / "backup", _row(1, output_dir=str(sweep / "1"), status="failed",
                                                error="old attempt", time="2025-12-31T00:00:00"))
    # a second model, failed, without output_dir in the row: keyed by its folder
    bad = _row(0, model="alexnet", status="failed", error="CUDA out of memory | retry")
    R.write_json_atomic(sweep / "4" / "result.json", {k: v for k, v in bad.items() if k != "params_original"})
    return sweep


def test_collect_rows(tmp_path):
    sweep = _make_sweep(tmp_path)
    with pytest.warns(UserWarning, match="corrupt"):
        df = R.collect_rows(sweep.parent.parent)  # any depth below
    assert list(df.columns) == R.RESULT_COLUMNS
    assert len(df) == 4
    assert df["model"].tolist() == ["alexnet", "resnet18", "resnet18", "resnet18"]
    assert df["rank_policy"].tolist()[1:] == ["none", "quantized", "ratio"]  # sorted by model, policy
    job1 = df[df["output_dir"] == str(sweep / "1")]
    assert len(job1) == 1 and job1["status"].iloc[0] == "ok"  # the complete copy wins
    assert df["output_dir"].iloc[0] == str(sweep / "4")  # filled from the folder
    assert df["train_speedup"].iloc[1] == pytest.approx(1.2)
    assert R.collect_rows(tmp_path / "empty").empty


def test_collect_rows_keeps_extra_columns_last(tmp_path):
    R.write_result(tmp_path / "a", _row(0, custom_metric=1.5))
    R.write_result(tmp_path / "b", _row(1))
    df = R.collect_rows(tmp_path)
    assert list(df.columns) == R.RESULT_COLUMNS + ["custom_metric"]
    assert df["custom_metric"].notna().sum() == 1


def test_write_tables_roundtrip(tmp_path):
    with pytest.warns(UserWarning):
        df = R.collect_rows(_make_sweep(tmp_path))
    csv_path, md_path = R.write_tables(df, tmp_path / "out")
    assert csv_path.name == "results.csv" and md_path.name == "results.md"
    back = pd.read_csv(csv_path)
    assert list(back.columns) == list(df.columns) and len(back) == len(df)
    for col in df.columns:
        a, b = df[col].tolist(), back[col].tolist()
        for x, y in zip(a, b):
            if R.is_missing(x):
                assert R.is_missing(y), col
            elif isinstance(x, (int, float)) and not isinstance(x, bool):
                assert math.isclose(float(x), float(y), rel_tol=1e-9), col
            else:
                assert str(x) == str(y), col
    md = md_path.read_text()
    assert "_Provenance:" in md and "Test CPU" in md and "abcdef1234" in md and "_Legend:" in md
    assert "| model" in md and "train speedup" in md and "1.22" in md  # 122/100
    assert "loop / bench" in md  # the fidelity column
    assert "failed: CUDA out of memory" in md
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(df)
    assert len({line.replace("\\|", "").count("|") for line in table_lines}) == 1  # no stray pipes from error text


def test_format_summary():
    text = R.format_summary(_row(2, params_original=11_700_000, params_decomposed=4_680_000, flops_original=1.8e9,
                                 flops_decomposed=0.9e9, top1_decomposed_pre=60.0, train_ips_original_min=95.0,
                                 train_ips_original_max=105.0, duration_s=12.0))
    assert "original" in text and "decomposed" in text
    assert "11.70 M" in text and "2.50x smaller" in text and "2.00x" in text
    assert "+30.00 pt drop" in text and "+1.50 pt drop" in text
    assert "1.22x speedup" in text and "95.0-105.0" in text
    assert "status: ok (12 s)" in text
    assert "fine-tuning loop" not in text  # a benchmark row has no loop throughput
    looped = R.format_summary(_row(2, train_ips_logged=110.0, train_ips_fidelity=0.9))
    assert "fine-tuning loop images/s" in looped and "110.0" in looped and "0.90x of the benchmark" in looped
    assert "between steps" not in looped and "paired" not in looped
    paired = R.format_summary(_row(2, train_ips_logged=110.0, train_ips_fidelity=0.8, train_ips_probe=115.0,
                                   train_ips_fidelity_paired=110.0 / 115.0))
    assert "benchmark between epochs" in paired and "115.0" in paired and "0.96x loop / benchmark, paired" in paired
    assert "0.80x against the benchmark after training but 0.96x paired" in paired  # the drift is named
    agree = R.format_summary(_row(2, train_ips_logged=110.0, train_ips_fidelity=0.92, train_ips_probe=115.0,
                                  train_ips_fidelity_paired=0.96))
    assert "after training but" not in agree
    overhead = R.format_summary(_row(2, train_ips_logged=110.0, train_ips_fidelity=0.9, train_loop_overhead=0.04))
    assert "fine-tuning loop: 4% of its wall time was spent between steps" in overhead
    assert "-" in R.format_summary({"status": "failed", "error": "boom"})


# --------------------------------------------------------------------------------------------- W&B


def test_wandb_offline_table(wandb_env):
    tmp_path = wandb_env
    df = R.rows_to_frame([_row(i) for i in range(3)])
    run_dir = R.log_wandb_table(df, project="lrd-test", group="sweep-1", mode="offline", dir=tmp_path / "wb")
    assert run_dir and Path(run_dir).is_dir() and Path(run_dir).name.startswith("offline-run-")
    files = R.find_wandb_table_files(tmp_path / "wb")
    assert len(files) == 1
    assert files[0].parent.name == "table" and Path(run_dir) in files[0].parents
    table = json.loads(files[0].read_text())
    assert table["columns"] == list(df.columns)
    assert len(table["data"]) == len(df)
    for rec, data in zip(df.to_dict("records"), table["data"]):
        got = dict(zip(table["columns"], data))
        assert got["model"] == rec["model"] and got["rank_policy"] == rec["rank_policy"]
        assert got["train_speedup"] == pytest.approx(rec["train_speedup"])
        assert got["rank_ratio"] == (None if R.is_missing(rec["rank_ratio"]) else rec["rank_ratio"])
    assert R.log_wandb_table(df.iloc[:0], project="p", group="g", dir=tmp_path / "wb2") is None
    assert R.log_wandb_table(df, project="p", group="g", mode="disabled", dir=tmp_path / "wb3") is None


# ------------------------------------------------------------------------------------ Hydra callback


def _cfg(sweep_dir: Path, enabled: bool) -> OmegaConf:
    return OmegaConf.create({
        "hydra": {"sweep": {"dir": str(sweep_dir)}},
        "logger": {"wandb": {"enabled": enabled, "mode": "offline", "project": "lrd-test", "entity": None}},
    })


def test_callback_aggregates_sweep(wandb_env, capsys):
    tmp_path = wandb_env
    sweep = tmp_path / "multirun" / "sweep-a"
    for i in range(3):
        R.write_result(sweep / str(i), _row(i, output_dir=str(sweep / str(i))))
    AggregateResults().on_multirun_end(_cfg(sweep, enabled=True))
    out = capsys.readouterr().out
    assert (sweep / "results.csv").is_file() and (sweep / "results.md").is_file()
    assert "| model" in out and "3 jobs, 3 ok" in out
    assert len(pd.read_csv(sweep / "results.csv")) == 3
    files = R.find_wandb_table_files(sweep)
    assert len(files) == 1 and len(json.loads(files[0].read_text())["data"]) == 3
    # re-aggregation (the W&B run dir now sits in the sweep dir) still finds exactly the job rows
    AggregateResults(wandb=False).on_multirun_end(_cfg(sweep, enabled=True))
    assert len(pd.read_csv(sweep / "results.csv")) == 3


def test_callback_zero_rows_does_not_raise(tmp_path, capsys):
    sweep = tmp_path / "empty-sweep"
    sweep.mkdir()
    AggregateResults().on_multirun_end(_cfg(sweep, enabled=True))
    AggregateResults().on_multirun_end(_cfg(tmp_path / "never-created", enabled=True))
    AggregateResults().on_multirun_end(OmegaConf.create({}))
    out = capsys.readouterr().out
    assert "no result.json" in out and "does not exist" in out
    assert not (sweep / "results.csv").exists()


def test_summary_and_table_flag_an_unstable_machine():
    calm = R.format_summary(_row(2, bench_round_spread=0.08))
    assert "unstable" not in calm
    rough = R.format_summary(_row(2, bench_round_spread=0.6))
    assert "timings unstable" in rough and "60%" in rough
    md = R.markdown_table(pd.DataFrame([_row(1, bench_round_spread=0.3)]))
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    cells = [c.strip() for c in header.split("|")]
    row = next(line for line in md.splitlines() if line.startswith("| resnet18"))
    assert [c.strip() for c in row.split("|")][cells.index("drift")] == "30%"


def test_markdown_shows_each_jobs_own_overrides_when_a_sweep_has_no_column_for_them():
    common = "experiment=digits_freeze_order"
    rows = [R.make_row(**_row(2, overrides=f"freeze.importance={imp} {common}", variant=None))
            for imp in ("weight_change", "cost")]
    md = R.markdown_table(R.rows_to_frame(rows))
    header, _, *body = md.splitlines()
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:3] == ["model", "variant", "overrides"]
    own = sorted(line.strip("|").split("|")[2].strip() for line in body)
    assert own == ["freeze.importance=cost", "freeze.importance=weight_change"]
    assert common not in md  # shared by every row: nothing to tell them apart
    # the variant column already names variant=...; rows that differ only there get no overrides column
    rows = [R.make_row(**_row(2, overrides=f"variant={v} {common}", variant=v)) for v in ("lrd", "lrd_both")]
    assert "overrides" not in R.markdown_table(R.rows_to_frame(rows)).splitlines()[0]
    assert R.own_overrides(R.rows_to_frame(rows[:1])) is None


def test_own_overrides_keep_bracketed_values_whole_and_skip_keys_with_a_column():
    assert R.split_overrides("a=1 bench.variants=[{label: x, rank: {multiple: 16}}] c='p q' d=2") == [
        "a=1", "bench.variants=[{label: x, rank: {multiple: 16}}]", "c='p q'", "d=2"]
    rows = [R.make_row(**_row(2, overrides=o)) for o in (
        "rank.policy=none freeze=none rank.include=[layer1.*, layer2.*]",
        "rank.policy=quantized freeze=sequential rank.include=[layer3.*]")]
    assert R.own_overrides(R.rows_to_frame(rows)) is not None
    own = sorted(R.own_overrides(R.rows_to_frame(rows)))
    assert own == ["rank.include=[layer1.*, layer2.*]", "rank.include=[layer3.*]"]
    # DESIGN's sweep varies only keys with columns: no overrides column
    rows = [R.make_row(**_row(2, overrides=f"rank.policy={p} freeze={f}"))
            for p in ("none", "quantized") for f in ("none", "sequential")]
    assert R.own_overrides(R.rows_to_frame(rows)) is None
