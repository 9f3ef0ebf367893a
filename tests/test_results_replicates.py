"""Replicates over seeds: one row per configuration with the mean and the Student-t 95 % interval."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lrd_exp.results import make_row
from lrd_exp.results.replicates import aggregate_replicates, mean_ci95, split_seed


def test_mean_and_interval_against_a_hand_computation():
    # three values: mean 2, sample sd 1, t(0.975, 2) = 4.302652729749464 (tables), half-width t * 1 / sqrt(3)
    mean, ci, n = mean_ci95([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3)
    assert ci == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-9)
    # two values 10 and 14: sd = 2 * sqrt(2), t(0.975, 1) = 12.706204736174705
    mean, ci, _ = mean_ci95([10.0, 14.0])
    assert mean == 12.0 and ci == pytest.approx(12.706204736174705 * 2 * math.sqrt(2) / math.sqrt(2))
    assert mean_ci95([5.0]) == (5.0, None, 1) and mean_ci95([]) == (None, None, 0)
    assert mean_ci95([1.0, float("nan"), 3.0])[2] == 2


def test_split_seed_keeps_the_rest_of_the_overrides_whole():
    assert split_seed("rank.ratio=2 seed=1 freeze=none") == ("rank.ratio=2 freeze=none", "1")
    assert split_seed("bench.variants=[{a: 1, b: 2}] seed=0") == ("bench.variants=[{a: 1, b: 2}]", "0")
    assert split_seed("rank.ratio=2") == ("rank.ratio=2", None)


def rows() -> pd.DataFrame:
    out = []
    for ratio, accs in ((2, [98.0, 97.0, 99.0]), (4, [95.0, 94.0, 93.0])):
        for seed, acc in enumerate(accs):
            out.append(make_row(model="resnet18", rank_policy="quantized", rank_ratio=ratio, freeze="sequential",
                                seed=seed, overrides=f"rank.ratio={ratio} seed={seed}", status="ok",
                                top1_original=99.0, top1_decomposed=acc, train_ips_original=100.0,
                                train_ips_decomposed=100.0 + 10 * seed + ratio, val_images=898))
    out.append(make_row(model="resnet18", rank_policy="quantized", rank_ratio=8, seed=0, status="failed",
                        overrides="rank.ratio=8 seed=0"))
    return pd.DataFrame(out)


def test_a_seed_sweep_becomes_one_row_per_configuration():
    agg = aggregate_replicates(rows()).set_index("rank_ratio")
    assert list(agg.index) == [2, 4] and list(agg.n_seeds) == [3, 3] and agg.loc[2, "seeds"] == "0 1 2"
    assert agg.loc[2, "top1_decomposed_mean"] == pytest.approx(98.0)
    assert agg.loc[2, "top1_decomposed_ci95"] == pytest.approx(4.302652729749464 / math.sqrt(3))
    assert agg.loc[4, "top1_drop_mean"] == pytest.approx(99.0 - 94.0)
    assert agg.loc[4, "top1_drop_ci95"] == pytest.approx(agg.loc[4, "top1_decomposed_ci95"])  # same spread
    # speedups 1.02, 1.12, 1.22 (ratio 2): mean 1.12, sd 0.1
    assert agg.loc[2, "train_speedup_mean"] == pytest.approx(1.12)
    assert agg.loc[2, "train_speedup_ci95"] == pytest.approx(4.302652729749464 * 0.1 / math.sqrt(3))
    assert agg.loc[2, "overrides"] == "rank.ratio=2" and agg.loc[2, "val_images"] == 898


def test_without_replicates_there_is_nothing_to_aggregate():
    single = rows().groupby("rank_ratio").head(1)
    assert aggregate_replicates(single).empty


def test_a_seed_sweeps_tables_show_mean_and_interval_and_the_resolution(tmp_path):
    from lrd_exp.results import write_tables

    df = rows()
    write_tables(df, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "Mean ± 95 % confidence interval over seeds" in md
    assert f"98.00 ± {4.302652729749464 / math.sqrt(3):.2f}" in md  # ratio 2: top-1 dec
    assert "898 validation images, so one image is worth 0.11 points" in md
    agg = pd.read_csv(tmp_path / "replicates.csv")
    assert list(agg.n_seeds) == [3, 3]
    # a table without replicates looks as before: no interval section, no replicates.csv
    write_tables(df.groupby("rank_ratio").head(1), tmp_path / "single")
    assert "confidence interval" not in (tmp_path / "single" / "results.md").read_text()
    assert not (tmp_path / "single" / "replicates.csv").exists()


def test_the_figures_draw_the_intervals_as_error_bars(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from lrd_exp.results import figures

    bars = []
    real = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        bars.append((list(x), list(y), kwargs.get("yerr"), kwargs.get("xerr")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    df = rows()
    assert figures.versus_compression(df, tmp_path / "drop.png", "top1_drop", "drop").is_file()
    (x, y, yerr, _), = bars
    assert x == [2, 4] and y == pytest.approx([1.0, 5.0])  # one line (sequential): drop at ratio 2 and 4
    assert list(yerr) == pytest.approx([4.302652729749464 / math.sqrt(3)] * 2)
    bars.clear()
    assert figures.throughput_vs_accuracy(df, tmp_path / "tva.png").is_file()
    assert len(bars) == 2 and all(b[2][0] > 0 and b[3][0] > 0 for b in bars)  # each variant: both intervals
    assert figures.versus_compression(df.head(3), tmp_path / "none.png", "top1_drop", "drop") is None  # one ratio
