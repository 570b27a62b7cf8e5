"""`train.profile.steps=[first,last]`: a torch.profiler trace of those train steps.

Traces are written to `<run dir>/profile/rank<r>_steps<first>-<last>.json` (Chrome trace format:
open in chrome://tracing or https://ui.perfetto.dev) by the ranks in `train.profile.ranks`
(default [0]; [] or null = every rank). CUDA kernels are included on GPU.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


class StepProfiler:
    def __init__(self, first: int, last: int, out_dir: str, rank: int, device: torch.device,
                 record_shapes: bool = False, profile_memory: bool = False,
                 with_stack: bool = False):
        self.first, self.last = first, last
        self.out_dir, self.rank = out_dir, rank
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.kwargs = dict(activities=acts, record_shapes=record_shapes,
                           profile_memory=profile_memory, with_stack=with_stack)
        self.prof: Optional[torch.profiler.profile] = None
        self.path: Optional[str] = None
        self.device = device

    def step_begin(self, step: int) -> None:
        """Call before train step `step` (1-based) runs."""
        if self.first <= step <= self.last and self.prof is None and self.path is None:
            self.prof = torch.profiler.profile(**self.kwargs)
            self.prof.__enter__()
        if self.prof is not None:
            self._range = torch.profiler.record_function(f"train_step_{step}")
            self._range.__enter__()

    def step_end(self, step: int) -> None:
        """Call after train step `step` finished."""
        if self.prof is None:
            return
        self._range.__exit__(None, None, None)
        self.prof.step()
        if step >= self.last:
            self.finish()

    def finish(self) -> Optional[str]:
        if self.prof is None:
            return self.path
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        os.makedirs(self.out_dir, exist_ok=True)
        self.path = os.path.join(self.out_dir,
                                 f"rank{self.rank}_steps{self.first}-{self.last}.json")
        self.prof.export_chrome_trace(self.path)
        self.prof = None
        from framework.training.console import echo

        echo(f"rank {self.rank}: wrote profiler trace {self.path}")
        return self.path


def build_profiler(profile_cfg, run_dir: str, rank: int, device: torch.device,
                   max_steps: Optional[int] = None) -> Optional[StepProfiler]:
    """The profiler for this rank, or None (profiling off, or another rank's job)."""
    from framework.config import ConfigError

    steps = list(profile_cfg.steps or [])
    if not steps:
        return None
    if len(steps) == 1:
        steps = steps * 2
    if len(steps) != 2 or not (1 <= steps[0] <= steps[1]):
        raise ConfigError(f"train.profile.steps={steps} must be [first, last] with "
                          f"1 <= first <= last")
    if max_steps is not None:
        if steps[0] > max_steps:
            return None
        steps[1] = min(steps[1], max_steps)
    ranks = profile_cfg.ranks
    if ranks and rank not in ranks:
        return None
    return StepProfiler(steps[0], steps[1], os.path.join(run_dir, "profile"), rank, device,
                        record_shapes=profile_cfg.record_shapes,
                        profile_memory=profile_cfg.profile_memory,
                        with_stack=profile_cfg.with_stack)
