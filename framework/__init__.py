"""A Hydra-configured training framework on NVIDIA megatron-core."""
import os as _os

from framework.quiet import quiet_third_party as _quiet

_quiet()  # megatron-core's irrelevant INFO records and warnings (framework/quiet.py)
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(cfg, overrides=None):
    """Plan the run, launch (or join) the workers and train (framework/runner.py). `overrides`:
    the command line's, which name the checkpoint directory (framework.cli.RUN_CONTROL_KEYS).
    Imported on call: `import framework` stays free of torch and megatron-core."""
    from framework.runner import run as _run

    return _run(cfg, overrides)
