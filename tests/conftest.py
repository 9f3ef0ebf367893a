"""Shared fixtures: compose the real config (Hydra compose API) with outputs under ``tmp_path``, run ``run.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig

# W&B never talks to the network in tests; set before anything imports wandb (subprocesses inherit it).
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose_config(overrides: Sequence[str] = (), *, tmp_path: Path | None = None, wandb: bool = False) -> DictConfig:
    """``config.yaml`` + ``overrides`` exactly as ``run.py`` composes it (without the ``hydra`` node).

    With ``tmp_path``, ``paths.cache_dir`` / ``paths.data_dir`` / ``paths.output_dir`` point into it unless the
    overrides set them; W&B is disabled unless ``wandb`` is true or the overrides set ``logger.wandb.enabled``.
    """
    from hydra import compose, initialize_config_dir

    from lrd_exp.cli import prepare

    prepare()
    overrides = list(overrides)
    given = {_key(o) for o in overrides}
    defaults = []
    if tmp_path is not None:
        for key, sub in (("paths.cache_dir", "cache"), ("paths.data_dir", "data"), ("paths.output_dir", "out")):
            if key not in given:
                defaults.append(f"{key}={tmp_path / sub}")
    if not wandb and "logger.wandb.enabled" not in given:
        defaults.append("logger.wandb.enabled=false")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides + defaults, return_hydra_config=False)


@pytest.fixture
def cfg_factory(tmp_path: Path) -> Callable[..., DictConfig]:
    """``cfg_factory(overrides, wandb=False)``: the composed config with every output under ``tmp_path``."""

    def factory(overrides: Sequence[str] = (), *, wandb: bool = False) -> DictConfig:
        return compose_config(overrides, tmp_path=tmp_path, wandb=wandb)

    return factory


def run_cli(args: Sequence[str], *, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python run.py <args>`` from the repository root, as a user runs it."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    # one intra-op thread: on a busy 2-core box OpenMP spin-waiting made a smoke job 4x slower
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def single_thread():
    """Run a test's torch work on one intra-op thread (predictable time on a loaded machine), then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
