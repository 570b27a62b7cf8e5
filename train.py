"""Train a Megatron model: `python train.py [model=...] [parallel=...] [key=value ...]`.

Hydra composes conf/train.yaml; the result is type-checked against framework.config's
dataclasses, then `framework.run` plans the run and launches the workers (or joins
torchrun/SLURM's).
"""
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from framework.cli import (check_group_choices, check_overrides_take_effect, checkpoint_overrides,
                           check_required_groups, default_checkpoint_dir,
                           install_masked_cfg_printing, is_multirun, register_resolvers,
                           report_errors, run_hydra_main, task_overrides)
from framework.config import Config, check_unknown_keys, register_configs
from framework.security.plugins import check_plugin_targets

register_configs()
register_resolvers()
install_masked_cfg_printing()  # `--cfg job` masks secrets
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def to_config(dcfg: DictConfig) -> Config:
    hc = HydraConfig.get()
    check_group_choices(dict(hc.runtime.choices), CONF_DIR)
    check_required_groups(dict(hc.runtime.choices), CONF_DIR,
                          ("model", "parallel", "optimizer", "data", "logging"))
    if dcfg.checkpoint.dir is None:
        dcfg.checkpoint.dir = default_checkpoint_dir(
            checkpoint_overrides(task_overrides(hc), multirun=is_multirun()), hc.runtime.cwd)
    dcfg.run_dir = hc.runtime.output_dir
    check_plugin_targets(dcfg)  # `_target_` only at plugin points, before anything is built
    check_unknown_keys(dcfg)
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, Config)
    check_overrides_take_effect(cfg, task_overrides(hc))
    return cfg


@hydra.main(version_base=None, config_path="conf", config_name="train")
def main(dcfg: DictConfig) -> None:
    from framework import run

    # in a sweep (-m) a failed job is recorded in its directory and the next job runs
    job_dir = HydraConfig.get().runtime.output_dir if is_multirun() else None
    overrides = task_overrides(HydraConfig.get())  # for the resume command it prints
    report_errors(lambda: run(to_config(dcfg), overrides=overrides), job_dir=job_dir)


if __name__ == "__main__":
    run_hydra_main(main, Config)  # Hydra's own errors too: one line, exit 2
