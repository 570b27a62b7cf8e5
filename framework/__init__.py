"""A Hydra-configured training framework on NVIDIA megatron-core."""
import os as _os

from framework.quiet import quiet_third_party as _quiet

_quiet()  # megatron-core's irrelevant INFO records and warnings (framework/quiet.py)
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(cfg, overrides=None):
    """Launch (or join) the workers and train. See framework.run."""
    from framework.run import run as _run

    return _run(cfg, overrides)
