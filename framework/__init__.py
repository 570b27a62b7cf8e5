"""A Hydra-configured training framework on NVIDIA megatron-core."""
import os as _os
import warnings as _warnings

# megatron-core warns at import that TE/apex are absent; we know, and fall back on purpose.
_warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
_warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(cfg):
    """Plan the run, launch (or join) the workers and train (framework/runner.py). Imported on
    call: `import framework` stays free of torch and megatron-core."""
    from framework.runner import run as _run

    return _run(cfg)
