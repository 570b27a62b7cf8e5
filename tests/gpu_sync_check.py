"""`python tests/gpu_sync_check.py <train.py overrides>`: train.py with CUDA's sync debug mode on
inside every train step after the first two. Each host-device synchronisation in those steps (an
`.item()`, a blocking copy, a stream synchronise) is recorded with the Python stack that made it;
the script ends by printing how many steps were checked and every distinct synchronising stack.
CUDA's sync debug mode does not see a copy from pageable host memory, which waits for the GPU's
queued work too, so the script also counts the batches (tensors) that were not page-locked when
the train step took them. Used by tests/test_gpu_fast.py (train.defer_step_stats,
data.pin_memory)."""
import os
import runpy
import sys
import traceback
import warnings

import torch

from helpers import ROOT  # tests/, this script's folder, is sys.path[0]

sys.path.insert(0, ROOT)

from framework.data import batches  # noqa: E402
from framework.training import loop  # noqa: E402

checked, stacks, tensors = [], {}, {"pinned": 0, "pageable": 0}
_step = loop.Trainer.train_step
_show = warnings.showwarning


def _record(message, category, filename, lineno, file=None, line=None):
    if "synchronizing" in str(message):
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename]
        if frames and frames[-1].name == "set_sync_debug_mode":
            return  # switching the mode on reports itself: not a synchronisation
        key = "".join(traceback.format_list(frames[-6:]))
        stacks[key] = stacks.get(key, 0) + 1
    else:
        _show(message, category, filename, lineno, file, line)


def train_step(self, iterators, step):
    strict = step > 2  # the first steps allocate, autotune and build lazily
    if strict:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        return _step(self, iterators, step)
    finally:
        if strict:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(step)


def next_batch(self, _next=batches.MicroBatchIterator.__next__):
    batch = _next(self)
    for v in batch.values():
        tensors["pinned" if v.is_pinned() else "pageable"] += 1
    return batch


loop.Trainer.train_step = train_step
batches.MicroBatchIterator.__next__ = next_batch
warnings.showwarning = _record
warnings.simplefilter("always")
sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"SYNC CHECK: {len(checked)} steps checked, {sum(stacks.values())} synchronisations")
    print(f"PIN CHECK: {tensors['pinned']} pinned, {tensors['pageable']} pageable batch tensors")
    for key, n in stacks.items():
        print(f"--- {n}x at:\n{key}")
