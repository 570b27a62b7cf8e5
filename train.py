"""Train a Megatron model: `python train.py [model=...] [parallel=...] [key=value ...]`.

Hydra composes conf/train.yaml; the result is type-checked against framework.config's
dataclasses, then `framework.run` plans the run and launches the workers (or joins
torchrun/SLURM's).
"""
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from framework.cli import (config_from_hydra, install_masked_cfg_printing, is_multirun,
                           register_resolvers, report_errors, run_hydra_main, task_overrides)
from framework.config import Config, register_configs

register_configs()
register_resolvers()
install_masked_cfg_printing()  # `--cfg job` masks secrets
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def to_config(dcfg: DictConfig) -> Config:
    return config_from_hydra(dcfg, HydraConfig.get(), CONF_DIR, multirun=is_multirun())


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(dcfg: DictConfig) -> None:
    from framework import run

    # in a sweep (-m) a failed job is recorded in its directory and the next job runs
    job_dir = HydraConfig.get().runtime.output_dir if is_multirun() else None
    overrides = task_overrides(HydraConfig.get())  # for the resume command it prints
    report_errors(lambda: run(to_config(dcfg), overrides=overrides), job_dir=job_dir)


if __name__ == "__main__":
    run_hydra_main(main, Config)  # Hydra's own errors too: one line, exit 2
