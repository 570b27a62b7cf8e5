"""Non-finite steps and loss spikes: `NanGuard` applies `train.nan_policy` (skip | stop) and
`train.max_consecutive_nan` to the outcome of each optimizer step (the steps themselves, which
see a non-finite loss or grad norm before the update, are in `framework.optimizer_step`);
`SpikeDetector` warns when the loss jumps above `train.spike_factor` x its running mean.
"""
from __future__ import annotations

import math
from typing import Optional

from framework.errors import ConfigError


class NonFiniteError(ConfigError):
    """The run met more non-finite steps than the policy allows (reported as one line)."""


class NanGuard:
    def __init__(self, policy: str = "skip", max_consecutive: int = 10):
        self.policy, self.max_consecutive = policy, max_consecutive
        self.consecutive = 0

    def check(self, step: int, non_finite: bool, loss: float, grad_norm) -> Optional[str]:
        """A warning line for a skipped step; raises NonFiniteError when the run must stop."""
        if not non_finite:
            self.consecutive = 0
            return None
        self.consecutive += 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"grad norm {grad_norm}"
        if self.policy == "stop":
            raise NonFiniteError(f"non-finite {what} at iteration {step} (train.nan_policy=stop)")
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"non-finite {what} at iteration {step}: {self.consecutive} consecutive "
                f"non-finite steps (train.max_consecutive_nan={self.max_consecutive})")
        return f"warning: non-finite {what} at iteration {step}; update skipped"


class SpikeDetector:
    """Loss > factor x exponential running mean (after `warmup` steps) is a spike."""

    def __init__(self, factor: Optional[float], warmup: int = 10, beta: float = 0.9):
        self.factor, self.warmup, self.beta = factor, warmup, beta
        self.mean: Optional[float] = None
        self.seen = 0
        self.spikes = 0

    def check(self, step: int, loss: float) -> Optional[str]:
        if self.factor is None or not math.isfinite(loss):
            return None
        msg = None
        if self.mean is not None and self.seen >= self.warmup and loss > self.factor * self.mean:
            self.spikes += 1
            msg = (f"warning: loss spike at iteration {step}: {loss:.4f} > {self.factor} x running "
                   f"mean {self.mean:.4f} ({self.spikes} so far)")
        self.mean = loss if self.mean is None else self.beta * self.mean + (1 - self.beta) * loss
        self.seen += 1
        return msg
