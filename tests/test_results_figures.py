"""Paper figures: each plotting function on a tiny frame, skipping on missing data, and the CLI end to end."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from lrd_exp import results as R  # noqa: E402
from lrd_exp.results import figures as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path | None) -> bool:
    return path is not None and path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def _results_frame() -> pd.DataFrame:
    rows = []
    for model, base_ips in (("resnet18", 100.0), ("vit_tiny_patch16_224", 60.0)):
        for j, (policy, ratio, mult, freeze) in enumerate([
            ("ratio", 2.0, None, "none"),
            ("quantized", 2.0, 8, "none"),
            ("quantized", 2.0, 8, "sequential"),
            ("optimized", 2.0, 64, "sequential"),
        ]):
            rows.append(dict(model=model, rank_policy=policy, rank_ratio=ratio, rank_multiple=mult, freeze=freeze,
                             device="cuda", device_name="NVIDIA H100 80GB HBM3", status="ok",
                             train_ips_original=base_ips, train_ips_decomposed=base_ips * (0.9 + 0.2 * j),
                             infer_ips_original=2 * base_ips, infer_ips_decomposed=2 * base_ips * (1.0 + 0.1 * j),
                             top1_original=92.0, top1_decomposed=91.5 - 0.3 * j))
    rows.append(dict(model="resnet18", rank_policy="energy", rank_energy=0.95, freeze="none", status="failed",
                     error="boom"))
    return R.rows_to_frame(rows)


def _curves_frame() -> pd.DataFrame:
    recs = []
    for variant, freeze, speed in (("quant r=2 m=8 | no freeze", "none", 1.0),
                                   ("quant r=2 m=8 | seq. freeze", "sequential", 1.5)):
        for epoch in range(5):
            recs.append(dict(variant=variant, freeze=freeze, epoch=epoch, val_top1=min(95.0, 60 + 8 * speed * epoch)))
    return pd.DataFrame(recs)


def _timings_frame() -> pd.DataFrame:
    recs = [dict(layer="layer1.0.conv1", rank=-1, time_ms=1.0, objective="train", device_name="Test GPU")]
    for r in range(40, 140):
        t = 0.2 + 0.004 * r + (0.0 if r % 64 == 0 else 0.05 if r % 8 == 0 else 0.15)
        recs.append(dict(layer="layer1.0.conv1", rank=r, time_ms=t, objective="train", device_name="Test GPU"))
        recs.append(dict(layer="layer1.0.conv1", rank=r, time_ms=t / 3, objective="inference",
                         device_name="Test GPU"))
    recs.append(dict(layer="fc", rank=10, time_ms=0.1, objective="train", device_name="Test GPU"))
    return pd.DataFrame(recs)


def test_variant_label():
    assert F.variant_label({"rank_policy": "quantized", "rank_ratio": 2.0, "rank_multiple": 8,
                            "freeze": "sequential"}) == "quant r=2 m=8 | seq. freeze"
    assert (F.variant_label({"rank_policy": "energy", "rank_energy": 0.95, "freeze": None})
            == "energy e=0.95 | no freeze")
    # benchmark rows carry the user's bench.variants label: two variants of one policy stay apart
    assert F.variant_label({"task": "benchmark", "variant": "quantized+seq-size", "rank_policy": "quantized",
                            "freeze": "sequential"}) == "quantized+seq-size"
    assert F.variant_label({"task": "train", "variant": "lrd_both", "rank_policy": "quantized", "rank_ratio": 2,
                            "rank_multiple": 8, "freeze": "sequential"}) == "quant r=2 m=8 | seq. freeze"


def test_plot_functions(tmp_path):
    df = _results_frame()
    assert _is_png(F.throughput_vs_accuracy(df, tmp_path / "tva.png"))
    assert _is_png(F.speedup_bars(df, tmp_path / "bars.png"))
    assert _is_png(F.convergence(_curves_frame(), tmp_path / "conv.png"))
    assert _is_png(F.rank_saw_tooth(_timings_frame(), tmp_path / "saw.png"))
    assert _is_png(F.rank_saw_tooth(_timings_frame(), tmp_path / "saw_fc.png", layer="fc"))
    one = df[df["model"] == "resnet18"]  # single-model layout
    assert _is_png(F.throughput_vs_accuracy(one, tmp_path / "tva1.png"))
    assert _is_png(F.speedup_bars(one, tmp_path / "bars1.png"))


def test_plot_functions_skip_cleanly(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lrd_exp")
    empty = pd.DataFrame()
    assert F.throughput_vs_accuracy(empty, tmp_path / "a.png") is None
    assert F.speedup_bars(empty, tmp_path / "b.png") is None
    assert F.convergence(empty, tmp_path / "c.png") is None
    assert F.rank_saw_tooth(empty, tmp_path / "d.png") is None
    no_numbers = R.rows_to_frame([{"model": "m", "rank_policy": "ratio", "status": "ok"}])
    assert F.throughput_vs_accuracy(no_numbers, tmp_path / "e.png") is None
    assert F.speedup_bars(no_numbers, tmp_path / "f.png") is None
    assert F.rank_saw_tooth(_timings_frame(), tmp_path / "g.png", layer="missing") is None
    assert not list(tmp_path.iterdir())
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 7
    assert all(r.name == "lrd_exp" for r in caplog.records if "skipped" in r.getMessage())


def test_curves_from_sweep_labelled_by_job(tmp_path):
    sweep = tmp_path / "sweep"
    for i, freeze in enumerate(["none", "sequential"]):
        job = sweep / str(i)
        R.write_result(job, dict(model="resnet18", rank_policy="quantized", rank_ratio=2.0, rank_multiple=8,
                                 freeze=freeze, status="ok"))
        pd.DataFrame({"stage": ["baseline"] * 2 + ["finetune"] * 3, "epoch": [0, 1, 0, 1, 2], "step": range(5),
                      "val_top1": [50, 60, 70, 75 + 5 * i, 80 + 5 * i], "val_loss": 1.0, "train_loss": 1.0}
                     ).to_csv(job / "curves.csv", index=False)
    curves = F.load_curves([sweep])
    assert set(curves["variant"]) == {"resnet18: quant r=2 m=8 | no freeze", "resnet18: quant r=2 m=8 | seq. freeze"}
    assert len(curves) == 6  # fine-tune rows only
    assert F.frozen_variants(curves) == {"resnet18: quant r=2 m=8 | no freeze": False,
                                         "resnet18: quant r=2 m=8 | seq. freeze": True}  # the jobs' freeze column


def test_convergence_dashes_the_variants_whose_freeze_column_is_none(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    styles = {}
    real = Axes.plot

    def spy(self, *args, **kwargs):
        styles[kwargs.get("label")] = kwargs.get("linestyle")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    curves = _curves_frame().assign(variant=lambda d: d["variant"].str.replace(" | ", " / "))  # labels say nothing
    assert _is_png(F.convergence(curves, tmp_path / "conv.png"))
    assert styles == {"quant r=2 m=8 / no freeze": "--", "quant r=2 m=8 / seq. freeze": "-"}
    assert F.frozen_variants(curves.drop(columns=["freeze"])) == {}  # no column: nothing is dashed


def test_cli_end_to_end(tmp_path):
    csv = tmp_path / "results.csv"
    _results_frame().to_csv(csv, index=False)
    curves = tmp_path / "curves_labelled.csv"
    _curves_frame().to_csv(curves, index=False)
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    _timings_frame().to_csv(sweep / "0" / "rank_timings.csv", index=False)
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "paper_figures.py"), str(csv), str(curves),
                           str(sweep), "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("throughput_vs_accuracy", "speedup_bars", "convergence", "rank_saw_tooth"):
        assert _is_png(out / f"{name}.png"), name

    only_results = tmp_path / "figs2"
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "paper_figures.py"), str(csv), "--out",
                           str(only_results)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in only_results.iterdir()) == ["speedup_bars.png", "throughput_vs_accuracy.png"]
    assert "convergence: skipped" in proc.stdout


@pytest.mark.parametrize("missing", ["nothing_here.csv"])
def test_cli_no_input_exits_nonzero(tmp_path, missing):
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "paper_figures.py"), str(tmp_path / missing),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not found" in proc.stdout


def test_advice_frontier_plots_the_table_and_skips_without_its_columns(tmp_path, caplog):
    df = pd.DataFrame({"rank.ratio": [None, 2, 4], "configuration": ["original", "ratio=2", "ratio=4"],
                       "train_speedup": [1.0, 1.5, 1.4], "approx_error": [0.0, 0.3, 0.5],
                       "frontier": [True, True, False], "recommended": [False, True, False], "model": "resnet50"})
    assert _is_png(F.advice_frontier(df, tmp_path / "a.png"))
    assert F.advice_frontier(df.drop(columns=["frontier"]), tmp_path / "b.png") is None
    assert "advice frontier: skipped" in caplog.text
    # the family is the row's rank.allocation column, whatever its label says
    assert [F.allocation_family(r) for r in ({"rank.allocation": "global"}, {"rank.ratio": 2},
                                             {"rank.allocation": "fastest", "configuration": "allocation=global"},
                                             {"rank.allocation": None})] == ["global", "uniform", "fastest", "uniform"]
    both = pd.concat([df.assign(**{"rank.allocation": "uniform"}),
                      df.assign(**{"rank.allocation": "global"})], ignore_index=True)
    assert _is_png(F.advice_frontier(both, tmp_path / "c.png"))


def test_advice_frontier_labels_points_from_the_grid_columns(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    texts = []
    real = Axes.annotate

    def spy(self, text, *args, **kwargs):
        texts.append(text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Axes, "annotate", spy)
    df = pd.DataFrame({"rank.ratio": [None, 2.0, 1.5], "freeze.schedule": [None, "none", "sequential"],
                       "configuration": ["original", "a label", "another"], "train_speedup": [1.0, 1.5, 1.2],
                       "approx_error": [0.0, 0.3, 0.2], "frontier": [True, True, True]})
    assert _is_png(F.advice_frontier(df, tmp_path / "a.png"))
    assert texts == ["original", "1.5 sequential", "2 none"]  # by error; 2.0 read back from a CSV shows as 2
