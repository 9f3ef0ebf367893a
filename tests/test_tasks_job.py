"""The job's row lifecycle (lrd_exp.tasks.job.JobRow) and the bench-setting resolvers (lrd_exp.tasks.settings)."""

from __future__ import annotations

import json

import pytest

from lrd_exp.config.validate import ConfigError
from lrd_exp.results.row import RESULT_FILENAME, STATUS_FAILED, STATUS_OK, STATUS_RUNNING
from lrd_exp.tasks.job import JobRow


def read_row(path) -> dict:
    return json.loads((path / RESULT_FILENAME).read_text())


def test_a_row_that_ran_is_ok_written_once_with_its_duration(tmp_path, capsys):
    row = {"model": "m"}
    with JobRow(row, str(tmp_path), summary=False) as job:
        assert not (tmp_path / RESULT_FILENAME).exists()  # not announced: written once, at the end
        row["train_ips_original"] = 10.0
    assert job.final["status"] == STATUS_OK and job.final["duration_s"] >= 0
    assert read_row(tmp_path) == json.loads(json.dumps(job.final))
    assert capsys.readouterr().out == ""


def test_an_announced_row_says_running_until_the_job_ends(tmp_path):
    with JobRow({"model": "m"}, str(tmp_path), announce=True, summary=False):
        assert read_row(tmp_path)["status"] == STATUS_RUNNING
    assert read_row(tmp_path)["status"] == STATUS_OK


@pytest.mark.parametrize("error", [ConfigError("rank.ratio=1 is not allowed"), RuntimeError("boom")])
def test_an_error_fails_the_row_and_stops_there(tmp_path, error):
    """The next variant (or sweep job) still runs: the error is in the row, not raised."""
    closed = []
    with JobRow({"model": "m"}, str(tmp_path), summary=False) as job:
        job.on_close(closed.append)
        raise error
    assert job.final["status"] == STATUS_FAILED and job.final["error"] == f"{type(error).__name__}: {error}"
    assert closed == [job.final] and read_row(tmp_path)["status"] == STATUS_FAILED


def test_an_interrupt_is_written_and_raised_again(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with JobRow({"model": "m"}, str(tmp_path), summary=False):
            raise KeyboardInterrupt
    row = read_row(tmp_path)
    assert row["status"] == STATUS_FAILED and row["error"] == "interrupted"


def test_the_bench_batch_follows_the_training_loop_when_null(cfg_factory):
    from lrd_exp.tasks.settings import bench_batch_size

    cfg = cfg_factory(["bench.batch_size=null", "trainer.batch_size=24"])
    assert bench_batch_size(cfg) == 24
    assert bench_batch_size(cfg_factory(["bench.batch_size=8", "trainer.batch_size=24"])) == 8


def test_advise_settings_are_the_benchmarks_with_advise_steps(cfg_factory):
    from lrd_exp.devices import resolve_device
    from lrd_exp.tasks.settings import advise_settings, bench_settings

    cfg = cfg_factory(["advise.steps=3", "advise.warmup=1", "bench.steps=9", "bench.warmup=4", "bench.rounds=2"])
    device = resolve_device("cpu")
    bench, advise = bench_settings(cfg, device), advise_settings(cfg, device)
    assert (bench.steps, bench.warmup, bench.flops) == (9, 4, True)
    assert (advise.steps, advise.warmup, advise.flops) == (3, 1, False)
    assert advise.rounds == bench.rounds == 2 and advise.precision == bench.precision
