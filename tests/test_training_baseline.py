"""The baseline cache: trained once then loaded, a corrupt entry rebuilt, concurrent callers train once, and a lock
held too long fails with one line that says what to do."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from lrd_exp.training import baseline
from lrd_exp.training.baseline import (
    DEFAULT_LOCK_TIMEOUT_S,
    LOCK_TIMEOUT_ENV,
    BaselineLockTimeout,
    baseline_key,
    baseline_spec,
    entry_path,
    lock_timeout,
)

# holds a FileLock on argv[1] until its stdin closes: "another job" training the baseline
HOLDER = """
import sys
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


class Trainer:
    """A ``train_fn`` that counts its calls and can take a while."""

    def __init__(self, seconds: float = 0.0):
        self.calls = 0
        self.seconds = seconds

    def __call__(self) -> dict:
        self.calls += 1
        time.sleep(self.seconds)
        return {"state_dict": {"w": torch.ones(2)}, "top1": 1.0}


@pytest.fixture
def cfg(cfg_factory):
    return cfg_factory(["trainer=smoke"])


def spec_of(cfg) -> dict:
    return baseline_spec(cfg.model, cfg.dataset, cfg.trainer, cfg.seed)


def get_or_train(cfg, train_fn):
    """The run's baseline, as a task asks for it."""
    return baseline.get_or_train(spec_of(cfg), cfg.paths.cache_dir, train_fn)


def lock_path(cfg) -> Path:
    return Path(entry_path(spec_of(cfg), cfg.paths.cache_dir) + ".lock")


@pytest.fixture
def holder(cfg):
    """Another process holding the baseline's lock; ``holder.release()`` ends it."""
    path = lock_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.release = lambda: (proc.stdin.close(), proc.wait(timeout=30))
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def test_trained_once_then_loaded_and_corrupt_entry_rebuilt(cfg):
    train = Trainer()
    entry, hit, path = get_or_train(cfg, train)
    assert not hit and train.calls == 1 and baseline_key(spec_of(cfg)) in path and entry["complete"]
    entry, hit, path2 = get_or_train(cfg, train)
    assert hit and train.calls == 1 and path2 == path and torch.equal(entry["state_dict"]["w"], torch.ones(2))

    Path(path).write_bytes(Path(path).read_bytes()[:20])  # truncated by a crash
    entry, hit, _ = get_or_train(cfg, train)
    assert not hit and train.calls == 2 and torch.equal(entry["state_dict"]["w"], torch.ones(2))
    entry, hit, _ = get_or_train(cfg, train)
    assert hit and train.calls == 2


def test_concurrent_callers_train_once(cfg):
    train = Trainer(seconds=0.5)  # long enough that the second caller finds the lock taken
    start = threading.Barrier(2)
    results = []

    def job():
        start.wait()
        results.append(get_or_train(cfg, train))

    threads = [threading.Thread(target=job) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert train.calls == 1
    assert sorted(hit for _, hit, _ in results) == [False, True]
    assert results[0][2] == results[1][2]
    assert len(list((Path(cfg.paths.cache_dir) / "baselines").glob("*.pt"))) == 1


def test_lock_held_too_long_fails_with_one_line(cfg, holder, monkeypatch):
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "0.5")
    train = Trainer()
    t0 = time.monotonic()
    with pytest.raises(BaselineLockTimeout) as err:
        get_or_train(cfg, train)
    assert time.monotonic() - t0 >= 0.5 and train.calls == 0
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, TimeoutError)
    assert str(lock_path(cfg)) in msg and "waited 0." in msg
    assert f"delete {lock_path(cfg)} if no job is running" in msg and LOCK_TIMEOUT_ENV in msg


def test_waits_for_the_holder_then_trains(cfg, holder, monkeypatch):
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    train = Trainer()
    results = []
    waiter = threading.Thread(target=lambda: results.append(get_or_train(cfg, train)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and train.calls == 0  # waiting on the other process
    holder.release()  # that job ends without an entry (killed, failed): this one trains
    waiter.join(timeout=60)
    assert train.calls == 1 and results[0][1] is False


def test_killed_holder_releases_the_lock(cfg, holder):
    holder.kill()
    holder.wait(timeout=30)
    entry, hit, _ = get_or_train(cfg, Trainer())  # the OS dropped the lock: no wait
    assert not hit and entry["complete"]


def test_lock_timeout_from_environment(monkeypatch):
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    assert lock_timeout() == DEFAULT_LOCK_TIMEOUT_S >= 3600
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "90")
    assert lock_timeout() == 90.0
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "-1")
    assert lock_timeout() == -1.0  # waits forever
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "two hours")
    with pytest.raises(ValueError, match=f"{LOCK_TIMEOUT_ENV}='two hours' is not a number of seconds"):
        lock_timeout()
