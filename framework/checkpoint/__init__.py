"""Checkpointing, one component:

* `state`: what a checkpoint holds (model chunks, optimizer, scheduler, every rank's RNG,
  `framework.json`) and `save_checkpoint` / `load_checkpoint` through megatron-core's
  `dist_checkpointing` (torch_dist: loads at any TP/PP/DP layout);
* `commit`: the commit protocol every writer uses (staging directory, fsync, rename, tracker);
* `reader`: the one safe way checkpoint files are read (closed tree, checked metadata, no
  pickled code runs);
* `manifest`: `manifest.json` (size and xxh3_64 of every file), written before the commit
  and verified before a load;
* `retention`: `checkpoint.keep_last`.
"""
from framework.checkpoint.manifest import MANIFEST, verify_checkpoint
from framework.checkpoint.reader import (META, TRACKER, iter_dir, latest_iteration, read_meta,
                                         stored_model_config)
from framework.checkpoint.retention import prune_checkpoints
from framework.checkpoint.state import (CheckpointSaveError, check_compatible, load_checkpoint,
                                        load_target, package_versions, save_checkpoint)
from framework.errors import CheckpointError

__all__ = ["CheckpointError", "CheckpointSaveError", "MANIFEST", "META", "TRACKER",
           "check_compatible", "iter_dir", "latest_iteration", "load_checkpoint", "load_target",
           "package_versions", "prune_checkpoints", "read_meta", "save_checkpoint",
           "stored_model_config", "verify_checkpoint"]
