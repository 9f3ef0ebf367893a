"""Entry point: ``python run.py [overrides]`` runs one job; ``python run.py -m ...`` a sweep.

Thin on purpose: the job is :func:`lrd_exp.tasks.run`; configs live in ``conf/``.
"""

import hydra
from omegaconf import DictConfig

from lrd_exp.cli import prepare, run_job

prepare()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run_job(cfg)


if __name__ == "__main__":
    main()
