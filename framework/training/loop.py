"""The training loop: a `while step < max_steps` budget over global batches.

GPU: megatron-core's `get_forward_backward_func` (no pipelining, 1F1B, or interleaved 1F1B with
virtual stages) over mcore-DDP-wrapped chunks. CPU: `forward_backward_cpu`, the same contract
(forward_step_func, data iterator, micro-batches) without CUDA. Everything else is shared.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.profiler import record_function

from framework.models.wrappers import unwrap
from framework.optimizer import allreduce_grads_cpu
from framework.optimizer_step import (deferred_optimizer_step, deferred_step_supported,
                                      guarded_optimizer_step)
from framework.training.console import echo
from framework.training.host_copy import HostCopy
from framework.training.metrics import MetricsLogger, Timer, format_line, memory_gb, peak_tflops
from framework.training.nan_guard import NanGuard, SpikeDetector
from framework.training.stop import StopRequest, describe_stop, report_clean_stop
from framework.training.watchdog import SAVE_PATIENCE, Watchdog

if TYPE_CHECKING:  # annotations only
    from framework.config import CheckpointConfig, TrainConfig


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_iters: int = 0
    nan_iters: int = 0


def forward_backward_cpu(*, forward_step_func, data_iterator, model, num_microbatches: int,
                         forward_only: bool = False, **_unused) -> List[Dict[str, torch.Tensor]]:
    """CPU twin of mcore's `forward_backward_no_pipelining` (which hard-codes CUDA)."""
    chunk = model[0] if isinstance(model, list) else model
    it = data_iterator[0] if isinstance(data_iterator, list) else data_iterator
    out = []
    for _ in range(num_microbatches):
        output, loss_fn = forward_step_func(it, chunk)
        loss, logs = loss_fn(output)
        if not forward_only:
            (loss / num_microbatches).backward()
        out.append(logs)
    if not forward_only:
        allreduce_grads_cpu([chunk])
    return out


@dataclass
class Runtime:
    """What the loop needs to know about the process layout (no config in here)."""

    device: torch.device
    dp_size: int
    world_size: int
    is_logging_rank: bool
    is_last_stage: bool
    seq_length: int
    flops_per_token: float


def _on_host(vals: torch.Tensor, keys: List[str]) -> Tuple[float, Dict[str, float]]:
    """Reduced losses (`Trainer._reduce_losses_tensor`) -> (lm loss, {other_key: value})."""
    values = vals.tolist()
    return values[0], dict(zip(keys[1:], values[1:]))


class _StepStats:
    """One step's stats as a float64 device tensor [losses..., updated, grad_norm, non_finite],
    copied to host memory as the step finishes; `read()` waits for that step only."""

    def __init__(self, step: int, values: torch.Tensor, keys: List[str]):
        self.step, self.keys = step, keys
        self.values = HostCopy(values)

    def read(self) -> Dict[str, Any]:
        v = self.values.read()
        n = len(self.keys)
        ok, norm, non_finite = v[n:n + 3]
        return {"step": self.step, "loss": v[0], "ok": bool(ok), "grad_norm": norm,
                "non_finite": bool(non_finite), "extra": dict(zip(self.keys[1:], v[1:n]))}


class Trainer:
    def __init__(self, model: List[torch.nn.Module], optimizer, scheduler, train_step, data,
                 train_cfg: "TrainConfig", ckpt_cfg: "CheckpointConfig", runtime: Runtime,
                 logger: Optional[MetricsLogger], save_fn: Callable[[TrainState], None]):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step_impl, self.data, self.cfg, self.ckpt_cfg = train_step, data, train_cfg, ckpt_cfg
        self.rt, self.logger, self.save_fn = runtime, logger, save_fn
        self.num_micro = train_cfg.global_batch_size // (train_cfg.micro_batch_size
                                                         * runtime.dp_size)
        self.on_gpu = runtime.device.type == "cuda"
        if self.on_gpu:
            from megatron.core.pipeline_parallel import get_forward_backward_func

            self.fwd_bwd = get_forward_backward_func()
            _wire_mcore_hooks(model, optimizer)
        else:
            self.fwd_bwd = forward_backward_cpu
        self.peak = peak_tflops(runtime.device)
        self.stop = StopRequest(train_cfg.max_minutes, device=runtime.device)
        self.eval_stop: Optional[str] = None  # the stop request that ended an evaluation
        self.nan_guard = NanGuard(train_cfg.nan_policy, train_cfg.max_consecutive_nan)
        self.spikes = SpikeDetector(train_cfg.spike_factor)
        self.watchdog: Optional[Watchdog] = None  # set by the caller (framework.runner)
        self.profiler = None  # training.profiling.StepProfiler, set by the caller (framework.runner)
        # train.defer_step_stats: each step's stats are read back one step late (see _StepStats)
        self.defer = train_cfg.defer_step_stats and deferred_step_supported(optimizer)
        self._pending: Optional[_StepStats] = None
        self.fp8_histories = [h for h in (getattr(unwrap(m), "fp8_history", None) for m in model)
                              if h is not None]

    # ---- one global batch -----------------------------------------------------------------
    def _run(self, iterators, forward_only: bool) -> List[Dict[str, torch.Tensor]]:
        return self.fwd_bwd(
            forward_step_func=self.step_impl.forward_step,
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.num_micro, seq_length=self.rt.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=forward_only)

    def train_step(self, iterators, step: int) -> List[Dict[str, Any]]:
        """Run global batch number `step`; return the stats of the steps that finished on the host
        (this one when steps are synchronous; the previous one, if any, when deferred)."""
        # phase/* ranges name the parts of a step in profiler traces (benchmarks/profile_summary)
        with record_function("phase/zero_grad"):
            self._zero_grads()
        self._mark(step, "forward/backward")
        with record_function("phase/forward_backward"):
            losses = self._run(iterators, forward_only=False)
            for h in self.fp8_histories:  # train.fp8=delayed: this step's amaxes into history
                h.step()
        self._mark(step, "loss all-reduce")
        with record_function("phase/reduce_loss"):
            vals, keys = self._reduce_losses_tensor(losses)
        self._mark(step, "optimizer step (grad norm all-reduce, update)")
        if self.defer:
            # the previous step's stats were copied while this step ran: reading them waits for
            # nothing, and a skipped previous step is known before this step's update
            done = self.flush()
            with record_function("phase/optimizer"):
                stats = deferred_optimizer_step(self.optimizer, vals[0])
                self.scheduler.step(increment=1)  # taken back in flush() if the step was skipped
            self._pending = _StepStats(step, torch.cat([vals.double(), stats]), keys)
            return done
        loss, extra = _on_host(vals, keys)
        # the finiteness checks come before the update (a NaN step never touches the weights)
        with record_function("phase/optimizer"):
            ok, grad_norm, non_finite = guarded_optimizer_step(self.optimizer, loss)
            if ok:
                self.scheduler.step(increment=1)
        return [{"step": step, "loss": loss, "ok": ok, "grad_norm": grad_norm,
                 "non_finite": non_finite, "extra": extra}]

    def flush(self) -> List[Dict[str, Any]]:
        """The stats of the deferred step still on the device, if any (waits for that step)."""
        if self._pending is None:
            return []
        rec, self._pending = self._pending.read(), None
        if not rec["ok"]:
            self.scheduler.step(increment=-1)  # a skipped update does not advance the schedule
        return [rec]

    @torch.no_grad()
    def evaluate(self) -> Optional[Tuple[float, int]]:
        """(mean held-out loss, batches evaluated), or None without held-out data. A stop
        request (a stop signal, the train.max_minutes deadline) ends it between batches, all
        ranks at the same one: the loop then saves and stops, as it would after a step, instead
        of finishing train.eval_iters batches first (a scheduler's SIGKILL would follow)."""
        if not self.cfg.eval_iters or self.data.valid is None:
            return None
        for m in self.model:
            m.eval()
        iterators = self.data.valid_iterators(len(self.model))
        total, done = 0.0, 0
        for i in range(self.cfg.eval_iters):
            if i:
                # agreed by every rank here; kept for the loop, whose own (deferred, on a GPU)
                # agreement would see it a step later
                self.eval_stop = self.stop.agreed()
                if self.eval_stop is not None:
                    break
            self._mark(i + 1, "evaluation (the number is the eval batch)")
            total += self._reduce_losses(self._run(iterators, forward_only=True))[0]
            done += 1
        for m in self.model:
            m.train()
        return total / done, done

    def _reduce_losses(self, losses: List[Dict[str, torch.Tensor]]
                       ) -> Tuple[float, Dict[str, float]]:
        """(lm loss, {other_key: value}) of `_reduce_losses_tensor`, on the host."""
        return _on_host(*self._reduce_losses_tensor(losses))

    def _reduce_losses_tensor(self, losses: List[Dict[str, torch.Tensor]]
                              ) -> Tuple[torch.Tensor, List[str]]:
        """Every reported loss ("lm loss", and e.g. BERT's "sop loss") averaged over
        micro-batches and DP on the last stage, in one all-reduce. "lm loss" is broadcast over
        the pipeline so every rank agrees; the others stay on the last stage (the logging rank's).
        Returns the values as one device tensor (no host synchronisation) and their keys
        ("lm loss" first, then the others with "_" for spaces)."""
        from megatron.core import parallel_state as ps

        last = self.rt.is_last_stage and bool(losses)
        keys = ["lm loss"] + (sorted(k for k in losses[0] if k != "lm loss") if last else [])
        val = torch.zeros(len(keys), dtype=torch.float32, device=self.rt.device)
        if last:
            val += torch.stack([torch.stack([d[k].float().reshape(()) for d in losses]).mean()
                                for k in keys]).to(val.device)
            if self.rt.dp_size > 1:
                dist.all_reduce(val, group=ps.get_data_parallel_group())
                val /= self.rt.dp_size
        if ps.get_pipeline_model_parallel_world_size() > 1:
            last_rank = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(val[:1], src=last_rank, group=ps.get_pipeline_model_parallel_group())
        return val, [k.replace(" ", "_") for k in keys]

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, state: TrainState) -> TrainState:
        cfg, rt = self.cfg, self.rt
        iterators = (self.data.train_iterators(len(self.model), state.consumed_samples)
                     if state.step < cfg.max_steps else None)
        bar = _progress(rt.is_logging_rank and cfg.progress_bar, state.step, cfg.max_steps)
        timer, window, acc_loss, last_saved = Timer(), 0, 0.0, state.step
        gbs_tokens = cfg.global_batch_size * rt.seq_length
        self.stop.install()
        try:
            if iterators is not None and self._graphed():
                self._capture_graphs(state)
            return self._fit(state, iterators, bar, timer, window, acc_loss, last_saved,
                             gbs_tokens)
        finally:
            self.stop.uninstall()

    def _zero_grads(self) -> None:
        """Training mode, and the gradients (DDP's grad buffers, the optimizer's) zeroed."""
        for m in self.model:
            m.train()
            if hasattr(m, "zero_grad_buffer"):
                m.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _graphed(self) -> bool:
        """model.cuda_graph: megatron-core's per-layer CUDA graphs are on."""
        return self.on_gpu and any(getattr(getattr(unwrap(m), "config", None),
                                           "cuda_graph_impl", "none") == "local"
                                   for m in self.model)

    def _capture_graphs(self, state: TrainState) -> None:
        """model.cuda_graph: megatron-core records its per-layer graphs during a process's first
        forward-backward and captures them at its end. That pass runs here, on the batch the
        first counted step will train on (read through iterators of its own), with every RNG
        state put back afterwards and no update: the gradients are zeroed when the step starts,
        and FP8 delayed histories keep what the pass primed (the first counted step's batch
        again) but not the step's amaxes, which mcore's warm-up on zero inputs also fed. So
        every counted step is a graphed one, in a fresh run and a resumed one alike; an eager
        first step rounds differently from a graphed one, and a run resumed from step k would
        otherwise leave the uninterrupted run's losses from step k + 2 on."""
        from framework.mcore_patches import rng_states_kept

        self._mark(state.step + 1, "CUDA-graph capture (a forward/backward, no update)")
        # its batches unpinned: with loader workers, pinning runs in a thread of its own, whose
        # CUDA calls during mcore's capture (global mode, at the end of this pass) would
        # invalidate it; in-process pinning runs before the layers, but one rule serves both
        data = dataclasses.replace(self.data, pin_memory=False)
        with record_function("phase/cuda_graph_capture"), rng_states_kept():
            self._zero_grads()
            self._run(data.train_iterators(len(self.model), state.consumed_samples),
                      forward_only=False)
            for h in self.fp8_histories:
                h.clear_step()

    def _mark(self, step: int, phase: str, patience: float = 1.0) -> None:
        if self.watchdog is not None:
            self.watchdog.mark(step, phase, patience)

    def _fit(self, state, iterators, bar, timer, window, acc_loss, last_saved, gbs_tokens):
        cfg, rt = self.cfg, self.rt
        stop, last = None, None  # last: the newest finished step's stats
        finite = 0  # the log window's steps with a finite loss (what acc_loss sums)
        while state.step < cfg.max_steps:
            self._mark(state.step + 1, "train step (zero grad)")
            if self.profiler is not None:
                self.profiler.step_begin(state.step + 1)
            done = self.train_step(iterators, state.step + 1)
            state.step += 1
            if self.profiler is not None:
                self.profiler.step_end(state.step)
            state.consumed_samples += cfg.global_batch_size
            window += 1
            bookkeeping = record_function("phase/bookkeeping")
            bookkeeping.__enter__()
            log_now = state.step % cfg.log_interval == 0 or state.step == cfg.max_steps
            eval_now = bool(cfg.eval_interval) and state.step % cfg.eval_interval == 0
            save_now = self.ckpt_cfg.save and state.step % self.ckpt_cfg.save_interval == 0
            if log_now or eval_now or save_now:
                done += self.flush()  # logs and checkpoints see every step up to this one
            for rec in done:
                loss = self._account(state, rec, bar)
                if loss is not None:
                    acc_loss, finite = acc_loss + loss, finite + 1
                last = rec
            if bar is not None:
                bar.update(1)
            if log_now:
                if self.on_gpu:
                    torch.cuda.synchronize()
                dt = timer.lap() / window
                # the mean of the window's finite losses; NaN when none was (a skipped step's
                # loss is not a 0 to average in)
                self._log_train(state, last, acc_loss / finite if finite else math.nan, dt,
                                gbs_tokens, bar)
                window, acc_loss, finite = 0, 0.0, 0
            if eval_now:
                self._log_eval(state, bar)
                timer.lap()
            if save_now:
                self._mark(state.step, "checkpoint save", patience=SAVE_PATIENCE)
                self.save_fn(state)
                last_saved = state.step
                timer.lap()
            self._mark(state.step, "stop-flag all-reduce")
            stop = self.stop.agreed(deferred=self.defer)
            stop = stop or self.eval_stop  # a stop that ended this step's evaluation
            bookkeeping.__exit__(None, None, None)
            if stop is not None:
                break
        for rec in self.flush():  # a stop between log steps
            self._account(state, rec, bar)
        if stop is not None:
            if rt.is_logging_rank:
                saving = ("saving a checkpoint" if self.ckpt_cfg.save
                          else "checkpoint.save=false: nothing is saved")
                _write(bar, f"stopping at iteration {state.step}: "
                            f"{describe_stop(stop, cfg.max_minutes)}; {saving}")
            if self.ckpt_cfg.save and last_saved != state.step:
                self._mark(state.step, "checkpoint save", patience=SAVE_PATIENCE)
                self.save_fn(state)
            if bar is not None:
                bar.close()
            report_clean_stop(state.step, stop,
                                  dist.get_rank() if dist.is_initialized() else 0)
            return state
        if cfg.eval_interval and state.step % cfg.eval_interval != 0:
            self._log_eval(state, bar)
        if self.ckpt_cfg.save and (last_saved != state.step or cfg.max_steps == 0):
            self._mark(state.step, "checkpoint save", patience=SAVE_PATIENCE)
            self.save_fn(state)
        if bar is not None:
            bar.close()
        return state

    def _account(self, state: TrainState, rec: Dict[str, Any], bar) -> Optional[float]:
        """Count a finished step's outcome and print its warnings (NaN policy, spikes); returns
        its loss for the log window's mean (None when non-finite: left out of the mean)."""
        if not rec["ok"]:
            state.skipped_iters += 1
        if rec["non_finite"]:
            state.nan_iters += 1
        for line in (self.nan_guard.check(rec["step"], rec["non_finite"], rec["loss"],
                                          rec["grad_norm"]),
                     self.spikes.check(rec["step"], rec["loss"])):
            if line and self.rt.is_logging_rank:
                _write(bar, line)
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        return rec["loss"] if math.isfinite(rec["loss"]) else None

    def _log_train(self, state, out, loss, dt, gbs_tokens, bar) -> None:
        if not self.rt.is_logging_rank:
            return
        tps = gbs_tokens / dt / self.rt.world_size
        tflops = tps * self.rt.flops_per_token / 1e12
        scale = self.optimizer.get_loss_scale()
        rec = {
            "step": state.step, "consumed_samples": state.consumed_samples, "loss": loss,
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": None if out["grad_norm"] is None else float(out["grad_norm"]),
            "ms_per_iter": 1000 * dt, "tokens_per_sec_per_gpu": tps, "tflops_per_gpu": tflops,
            # the whole job's rates (what a CPU run reports: its processes share the cores)
            "tokens_per_sec": tps * self.rt.world_size, "tflops": tflops * self.rt.world_size,
            "mfu": None if self.peak is None else tflops / self.peak,
            "skipped_iters": state.skipped_iters, "nan_iters": state.nan_iters,
            "mem_gb": memory_gb(self.rt.device),
            # what stays allocated between steps: params, grads, optimizer state (this rank)
            "mem_static_gb": (torch.cuda.memory_allocated(self.rt.device) / 2**30
                              if self.on_gpu else None),
            "loss_scale": float(scale.item() if torch.is_tensor(scale) else scale)
            if self.optimizer.config.fp16 else None,
        }
        rec.update(out["extra"])
        line = format_line(rec, self.cfg.max_steps, on_gpu=self.on_gpu)
        for k, v in out["extra"].items():
            line += f" | {k.replace('_', ' ')} {v:.4f}"
        _write(bar, line)
        if self.logger is not None:
            self.logger.log(rec)

    def _log_eval(self, state, bar) -> None:
        result = self.evaluate()
        if result is None or not self.rt.is_logging_rank:
            return
        loss, batches = result
        ppl = math.exp(min(loss, 50.0))
        cut = "" if batches == self.cfg.eval_iters else \
            f" (stopped after {batches} of train.eval_iters={self.cfg.eval_iters} batches)"
        _write(bar, f"eval at iter {state.step}: loss {loss:.4f} | ppl {ppl:.3f}{cut}")
        if self.logger is not None:
            self.logger.log({"step": state.step, "eval_loss": loss, "eval_ppl": ppl})


def _wire_mcore_hooks(model, optimizer) -> None:
    """Hook mcore DDP's overlap and grad finalisation into the schedule (as Megatron-LM does)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    config.grad_scale_func = optimizer.scale_loss
    ddp = getattr(model[0], "ddp_config", None)
    if ddp is not None and ddp.overlap_grad_reduce:
        fns = [m.no_sync for m in model]
        config.no_sync_func = fns[0] if len(model) == 1 else fns
        fns = [m.start_grad_sync for m in model]
        config.grad_sync_func = fns[0] if len(model) == 1 else fns
    if ddp is not None and ddp.overlap_param_gather:
        fns = [m.start_param_sync for m in model]
        config.param_sync_func = fns[0] if len(model) == 1 else fns
    config.finalize_model_grads_func = finalize_model_grads


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, leave=True)


def _write(bar, line: str) -> None:
    """A console line (above the progress bar, if any), also appended to the run's train.log."""
    echo(line)
