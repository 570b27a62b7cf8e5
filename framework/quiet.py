"""Third-party log records and warnings that say nothing to a user of this framework.

Filtered at their source (a logger's level, a warning's message and module), so everything else
megatron-core and torch report still gets through. Applied on import of `framework`, so in every
process, self-launched workers included.
"""
from __future__ import annotations

import logging
import warnings

# megatron-core loggers whose INFO records are internal detail: the Megatron-FSDP module announces
# itself at import (we do not use FSDP); the dataset builders dump their whole GPTDatasetConfig and
# index bookkeeping; the LR scheduler echoes its settings. Their warnings and errors still show.
QUIET_LOGGERS = (
    "megatron.core.distributed.fsdp",
    "megatron.core.datasets",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing",
)

# (message regex, module regex) of warnings about choices megatron-core makes for us
QUIET_WARNINGS = (
    # TE/apex are optional accelerators here; megatron-core falls back to torch on purpose
    (r".*Transformer Engine and Apex are not installed.*", ""),
    (r".*Apex is not installed.*", ""),
    # megatron-core's checkpoint loader calls torch APIs that torch has deprecated (its own
    # dist_checkpointing code, on every load)
    (r".*`load_state_dict` is deprecated.*", r"megatron\.core\.dist_checkpointing\..*"),
    (r".*deprecating ShardedTensor.*", r"torch\.distributed\.checkpoint\..*"),
    # megatron-core internals that torch or megatron-core itself deprecate, seen on import/build
    (r".*torch\.jit\.script_method.* is deprecated.*", r"torch\.jit\..*"),
    (r".*imports from `dynamic_context\.py` will be removed.*", r"megatron\.core\..*"),
    (r".*tp_group is None, using default tp group.*", r"megatron\.core\..*"),
)


def quiet_third_party() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level in (logging.NOTSET, logging.DEBUG, logging.INFO):
            logger.setLevel(logging.WARNING)
    for message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
