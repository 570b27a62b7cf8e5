"""Safe by default, in three parts:

* `masking`: secrets never reach disk (metrics, trackers, `.hydra/`, checkpoints, error lines).
* `plugins`: `_target_` only at the documented plugin points, for allowed module prefixes.
* `unpickling`: checkpoints are read without running pickled code; paths named inside a
  checkpoint stay inside it.
"""
