"""What ``run.py`` needs around the job: config registration, resolvers, and user errors without tracebacks."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lrd_exp.config.schema import register_configs


def job_dir_name(override_dirname: str) -> str:
    """A sweep job's folder: its overrides (readable, stable across re-runs), or 'default' when none."""
    name = override_dirname.replace("/", "_") or "default"
    return name[:200]


def register() -> None:
    """The schemas (``lrd_schema`` and the groups' ``schema``) and the ``lrd_job_dir`` resolver config.yaml uses.

    Run by ``run.py`` (:func:`prepare`), by the tests' compose, and by the ``hydra_plugins.lrd_exp_plugin`` module
    Hydra imports itself before a bare compose; importing ``lrd_exp`` registers nothing.
    """
    register_configs()
    if not OmegaConf.has_resolver("lrd_job_dir"):
        OmegaConf.register_new_resolver("lrd_job_dir", job_dir_name)


def prepare() -> None:
    """Register schemas and resolvers once, before Hydra composes anything; quiet known warnings."""
    register()
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    # conf/hydra/launcher/joblib.yaml shadows the plugin's structured config of the same name on purpose
    warnings.filterwarnings("ignore", "(?s).*'hydra/launcher/joblib' is validated against ConfigStore schema")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def run_job(cfg: DictConfig) -> float | None:
    """Run one job. A user error prints one line and exits 2 without a traceback; a job that failed (its row is
    written) exits 1. In a sweep neither stops the other jobs: the job returns None and the sweep goes on."""
    from lrd_exp.config.validate import ConfigError  # the job's modules load after --help has been answered
    from lrd_exp.devices.resolve import DeviceUnavailableError
    from lrd_exp.tasks import JobFailed, run

    try:
        return run(cfg)
    except JobFailed as exc:
        print(f"error: the job failed: {exc}", file=sys.stderr)
        if not in_multirun():
            sys.exit(1)
        return None
    except (ConfigError, DeviceUnavailableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not in_multirun():
            sys.exit(2)
        # in a sweep one bad job must not abort the others: it leaves a failed row and the sweep goes on
        from lrd_exp.tasks.job import write_failed_row

        write_failed_row(cfg, f"{type(exc).__name__}: {exc}")
        return None


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
