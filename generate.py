"""Generate text from a checkpoint: `python generate.py [load=<dir>] [prompts='["..."]'] [...]`.

Hydra composes conf/generate.yaml; the result is type-checked against
`framework.inference.GenerateConfig`, checked against the checkpoint (prompts, lengths, layout),
then `framework.inference.run_generate` launches TP x PP x DP workers (or joins torchrun/SLURM's).
Without arguments it loads `checkpoints/default` (what a plain `python train.py` writes) and, for
a model trained on data=embedded, reports accuracy on held-out arithmetic problems.
"""
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from framework.cli import (check_group_choices, default_checkpoint_dir,
                           install_masked_cfg_printing, register_resolvers, report_errors,
                           run_hydra_main, task_overrides)
from framework.config import check_unknown_keys, register_configs
from framework.inference import GenerateConfig, register_generate_config
from framework.security.plugins import check_plugin_targets

register_configs()
register_generate_config()
register_resolvers()
install_masked_cfg_printing()  # `--cfg job` masks secrets
CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")


def to_config(dcfg: DictConfig) -> GenerateConfig:
    hc = HydraConfig.get()
    check_group_choices(dict(hc.runtime.choices), CONF_DIR)
    cwd = hc.runtime.cwd
    check_plugin_targets(dcfg, points={})  # generation has no plugin points: no `_target_`
    check_unknown_keys(dcfg, GenerateConfig)  # `+key=` bypasses Hydra's struct mode
    # no parallel=... / parallel.x=... override: the layout comes from the checkpoint
    keys = [o.split("=", 1)[0].lstrip("+~") for o in task_overrides(hc)]
    if not any(k == "parallel" or k.startswith("parallel.") for k in keys):
        dcfg.parallel = None
    if dcfg.load is None:
        dcfg.load = default_checkpoint_dir("", cwd)
    dcfg.load = os.path.join(cwd, dcfg.load)
    if dcfg.output_file is not None:
        dcfg.output_file = os.path.join(cwd, dcfg.output_file)
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, GenerateConfig)
    return cfg


@hydra.main(version_base=None, config_path="conf", config_name="generate")
def main(dcfg: DictConfig) -> None:
    from framework.inference import run_generate

    report_errors(lambda: run_generate(to_config(dcfg)))


if __name__ == "__main__":
    run_hydra_main(main, GenerateConfig)  # Hydra's own errors too: one line, exit 2
