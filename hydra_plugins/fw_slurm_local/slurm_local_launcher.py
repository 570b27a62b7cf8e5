"""`hydra/launcher=slurm_local`: conf/hydra/launcher/slurm.yaml, run on this machine.

(Hydra finds launchers only in the `hydra_plugins` namespace package, hence this folder. It needs
hydra-submitit-launcher, the `sweeps` extra; without it this module defines nothing.)

A SLURM sweep cannot be tried without a cluster, so a broken SLURM config used to show up only
after the queue. This launcher takes the very same launcher config (it composes `slurm`) and:

* renders the sbatch script that hydra-submitit-launcher's `SlurmLauncher` would submit, with
  submitit's own renderer, so a parameter SLURM's executor rejects fails here as it would there
  (the script is kept as `<sweep dir>/.submitit/slurm_job.sh` to read);
* runs each job with submitit's local executor, one process per SLURM task (nodes x
  tasks_per_node, all on this machine), after slurm.yaml's own `setup` lines. Those lines run in
  a shell where SLURM's job variables are set (SLURM_JOB_ID, SLURM_JOB_NODELIST=localhost, ...)
  and `scontrol show hostnames` answers as SLURM's would;
* gives every task the variables srun gives it (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID), so
  `framework.run` joins the job through the same code as on a cluster (`_slurm_env`).

What it cannot show: the scheduler itself (partition, account, GPUs, time limits, requeue).
"""
from __future__ import annotations

import logging
import os
import shlex
from typing import Any, Dict, List, Sequence

from omegaconf import OmegaConf

try:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
except ImportError:  # no `sweeps` extra: Hydra's plugin scan must not warn on every run
    BaseSubmititLauncher = None

SBATCH_FILE = "slurm_job.sh"
log = logging.getLogger(__name__)
# answers `scontrol show hostnames <list>` (the only scontrol call a setup line should need)
_SCONTROL = ('scontrol() { if [ "$1" = show ] && [ "$2" = hostnames ]; then '
             'echo "$3" | tr , "\\n"; else echo "scontrol $*: not simulated by '
             'hydra/launcher=slurm_local" >&2; return 1; fi; }')


def simulated_job_env(nodes: int, tasks_per_node: int) -> Dict[str, str]:
    """The job-level variables SLURM sets before the sbatch script's setup lines run (the job
    id is the shell's pid, `$$`, set in `setup_lines`)."""
    return {"SLURM_JOB_NODELIST": ",".join(["localhost"] * nodes),
            "SLURM_NNODES": str(nodes), "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NTASKS": str(nodes * tasks_per_node),
            "SLURM_NTASKS_PER_NODE": str(tasks_per_node)}


def setup_lines(setup: Sequence[str], nodes: int, tasks_per_node: int) -> List[str]:
    """slurm.yaml's `setup`, preceded by SLURM's job environment (see the module doc)."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in
                   simulated_job_env(nodes, tasks_per_node).items())
    return [_SCONTROL, f"export SLURM_JOB_ID=$$ {env}", *setup]


def sbatch_script(params: Dict[str, Any], num_jobs: int, command: str) -> str:
    """The sbatch script SlurmLauncher would submit for these launcher params (an array of
    `num_jobs`), rendered by submitit; a ConfigError names what SLURM's executor rejects."""
    from submitit.slurm import slurm

    from framework.config import ConfigError

    renamed = slurm.SlurmExecutor._equivalence_dict()  # AutoExecutor's renaming of shared keys
    args: Dict[str, Any] = {}
    for key, value in params.items():
        if value is None or key in ("submitit_folder", "max_num_timeout", "_target_"):
            continue
        if key == "mem_gb":
            value = slurm._convert_mem(value)
        args[renamed.get(key, key)] = value
    unknown = sorted(set(args) - slurm.SlurmExecutor._valid_parameters())
    if unknown:
        raise ConfigError(f"hydra.launcher: {', '.join(unknown)} is not a parameter of "
                          f"submitit's SLURM executor")
    try:
        return slurm._make_sbatch_string(command=command, folder=params["submitit_folder"],
                                         map_count=num_jobs, **args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"hydra.launcher: SLURM would not accept it: {e}") from None


if BaseSubmititLauncher is not None:
    class SlurmLocalLauncher(BaseSubmititLauncher):
        """See the module doc. Takes every key of hydra-submitit-launcher's SLURM config."""

        _EXECUTOR = "local"

        def __init__(self, **params: Any) -> None:
            super().__init__(**params)
            self.slurm_params = dict(self.params)
            self.nodes = int(self.params.get("nodes") or 1)
            self.tasks_per_node = int(self.params.get("tasks_per_node") or 1)

        def launch(self, job_overrides, initial_job_idx):
            sweep_dir = str(self.config.hydra.sweep.dir)
            script = sbatch_script(self.slurm_params, len(job_overrides),
                                   "python -u -m submitit.core._submit <folder>")
            os.makedirs(os.path.join(sweep_dir, ".submitit"), exist_ok=True)
            path = os.path.join(sweep_dir, ".submitit", SBATCH_FILE)
            with open(path, "w") as f:
                f.write(script)
            log.info(f"the sbatch script SLURM would run: {path}; running "
                     f"{self.nodes} x {self.tasks_per_node} task(s) per job here")
            # the local executor: the shared keys, one "node" running every task, the setup lines
            shared = set(OmegaConf.structured(BaseQueueConf).keys())
            local = {k: v for k, v in self.slurm_params.items() if k in shared}
            local.update(nodes=1, tasks_per_node=self.nodes * self.tasks_per_node,
                         max_num_timeout=self.slurm_params.get("max_num_timeout", 0),
                         setup=setup_lines(self.slurm_params.get("setup") or [], self.nodes,
                                           self.tasks_per_node))
            self.params = local
            try:
                return super().launch(job_overrides, initial_job_idx)
            finally:
                self.params = self.slurm_params

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            # in each task: what srun sets per task, from the local executor's task number
            rank = int(os.environ["SUBMITIT_LOCAL_GLOBALID"])
            os.environ.update(SLURM_PROCID=str(rank),
                              SLURM_LOCALID=str(rank % self.tasks_per_node),
                              SLURM_NODEID=str(rank // self.tasks_per_node))
            return super().__call__(*args, **kwargs)
