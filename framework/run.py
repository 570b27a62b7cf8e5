"""`framework.run(cfg)`: launch workers if needed, then build and train on every rank.

* No WORLD_SIZE in the environment (a plain `python train.py`): start TP x PP x DP workers with
  torch's elastic launcher API and wait for them. One worker runs in-process.
* Under torchrun (WORLD_SIZE set) or SLURM (SLURM_PROCID/SLURM_NTASKS): use that environment.
"""
from __future__ import annotations

import os
import random
import socket
import signal
import sys
from dataclasses import asdict
from datetime import timedelta
from typing import Any, Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from framework.config import Config, ConfigError


# --------------------------------------------------------------------------------------------
# devices and launch
# --------------------------------------------------------------------------------------------
def resolve_device(kind: str, key: str = "train.device") -> str:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}=cuda but no CUDA device is visible; `{key}=auto` (the default) "
                          f"runs on the CPU here")
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return kind


def launched_externally() -> bool:
    return "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ


def planned_world_size(cfg: Config, device: str) -> int:
    """World size for a self-launch: every visible GPU (or TP x PP x DP if DP is fixed)."""
    if launched_externally():
        return int(os.environ.get("WORLD_SIZE") or os.environ["SLURM_NTASKS"])
    mp = cfg.parallel.model_parallel_size
    if cfg.parallel.data_parallel_size is not None:
        return mp * cfg.parallel.data_parallel_size
    if device == "cuda":
        n = torch.cuda.device_count()
        return (n // mp) * mp if n >= mp else mp
    return mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: Config, overrides: Optional[List[str]] = None) -> None:
    """Validate against the world, then launch (or join) the workers. `overrides` (the command
    line's, from train.py) make the printed resume / train-longer commands exact."""
    from framework.training.resilience import VERIFIED_ENV

    try:
        world = prepare(cfg)
        _run_prepared(cfg, overrides, world)
    finally:
        os.environ.pop(VERIFIED_ENV, None)


def _run_prepared(cfg: Config, overrides: Optional[List[str]], world: int) -> None:
    # after a stop signal the workers save before they exit: give them the time the watchdog
    # gives a save, not torch elastic's 30 s before it kills them
    from framework.cli import _rank
    from framework.training.resilience import SAVE_PATIENCE
    from framework.training.console import run_log
    from framework.training.summary import check_finished, print_summary

    with run_log(cfg.run_dir):
        # a checkpoint already at train.max_steps: say so (exit 0); past it: an error (exit 2)
        if check_finished(cfg, overrides, show=_rank() == 0):
            return
        launch(worker, cfg, world, shutdown_s=SAVE_PATIENCE * watchdog_seconds(cfg))
        if _rank() == 0:
            print_summary(cfg, overrides)


def prepare(cfg: Config) -> int:
    """Every check that needs no worker (the world, the device, checkpoints, tokenizer, data
    files, model settings, output directories); returns the world size. Nothing is built."""
    device = resolve_device(cfg.train.device)
    world = planned_world_size(cfg, device)
    cfg.resolve_world(world, on_gpu=device == "cuda")
    if device == "cuda" and not launched_externally() and world > torch.cuda.device_count():
        raise ConfigError(f"the layout needs {world} GPUs (TP x PP x DP) but "
                          f"{torch.cuda.device_count()} are visible")
    if cfg.model.cudnn_attention:
        from framework.fast import cudnn_attention

        if device != "cuda" or not cudnn_attention.available():
            raise ConfigError("model.cudnn_attention=true needs a CUDA device and the cuDNN "
                              "frontend (nvidia-cudnn-frontend, a Linux x86_64 dependency); "
                              "`model.cudnn_attention=null` uses it where it can and works here")
    if cfg.train.fp8:
        from framework.fast.fp8 import device_supports_fp8

        ok, why = device_supports_fp8() if device == "cuda" else (False, "it runs on the CPU")
        if not ok:
            raise ConfigError(f"train.fp8={cfg.train.fp8} needs a GPU with FP8 GEMMs (compute "
                              f"capability 8.9+: Ada, Hopper or newer), but {why}; unset "
                              f"train.fp8")
    from framework.training.resilience import preflight

    preflight(cfg, device)  # checkpoints, tokenizer, data, directories: one line, before workers
    return world


def launch(worker_fn: Callable[[Any], None], arg: Any, world: int,
           shutdown_s: float = 30.0) -> None:
    """Run `worker_fn(arg)` on every rank: join torchrun/SLURM, run in-process for one rank, or
    start `world` workers (`worker_fn` and `arg` must pickle: a module-level function).
    `shutdown_s`: how long the workers have to exit after a stop signal before they are killed."""
    if launched_externally():
        _slurm_env()
        worker_fn(arg)
    elif world == 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        try:
            worker_fn(arg)
        finally:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(k, None)
    else:
        _elastic_launch(worker_fn, arg, world, shutdown_s)


def _slurm_env() -> None:
    if "WORLD_SIZE" in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"under SLURM, set MASTER_ADDR and MASTER_PORT ({' and '.join(missing)} "
                          f"unset or empty; e.g. the first host of `scontrol show hostnames "
                          f"$SLURM_JOB_NODELIST` and a port from $SLURM_JOB_ID, as "
                          f"conf/hydra/launcher/slurm.yaml's setup does)")
    if os.environ["RANK"] == "0":
        print(f"joining SLURM job {os.environ.get('SLURM_JOB_ID', '?')}: "
              f"{os.environ['WORLD_SIZE']} tasks on {os.environ.get('SLURM_NNODES', '?')} "
              f"node(s), rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
              flush=True)


def _elastic_launch(worker_fn: Callable[[Any], None], arg: Any, world: int,
                    shutdown_s: float = 30.0) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from torch.distributed.elastic.multiprocessing.api import SignalException

    from framework.training.resilience import STOP_FILE_ENV

    # the agent forwards these to the workers (SIGTERM by default; add SIGUSR1), which save a
    # checkpoint and exit 0; rank 0 leaves a note in the stop file so we know it was clean.
    # newer torch (2.13 here) takes them from LaunchConfig.signals_to_handle and overwrites the
    # variable with it (SIGUSR1 then killed this process); older torch reads only the variable
    signals = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = signals
    _start_resource_tracker_immune_to(signal.SIGUSR1)
    import tempfile

    fd, stop_file = tempfile.mkstemp(prefix="fw-stop-")
    os.close(fd)
    os.environ[STOP_FILE_ENV] = stop_file
    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=f"fw{os.getpid()}",
                      rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                      max_restarts=0, monitor_interval=0.5, start_method="spawn",
                      shutdown_timeout=max(1, int(shutdown_s)),
                      **({"signals_to_handle": signals}
                         if "signals_to_handle" in LaunchConfig.__dataclass_fields__ else {}))
    try:
        elastic_launch(lc, _worker_entry)(worker_fn, arg)
    except SignalException as e:
        note = open(stop_file).read().split()
        if not note:
            raise RuntimeError(f"stopped by {signal_name(e.sigval)} before the workers saved a "
                               f"checkpoint") from None
        from framework.training.console import echo

        echo(f"stopped by {signal_name(e.sigval)}: the workers saved a checkpoint at iteration "
             f"{note[0]} and exited")
    except ChildFailedError as e:
        first = next(iter(e.failures.values()))
        msg = first.message
        if isinstance(msg, dict):  # elastic's error record: {'message': ..., 'extraInfo': ...}
            msg = msg.get("message", "")
        msg = str(msg).strip().splitlines()[-1] if msg else ""
        if first.exitcode == 2:  # _worker_entry printed the one-line error itself
            msg = "stopped on the error printed above"
        elif first.exitcode == 3:  # resilience.Watchdog: a hang, named in its error line
            msg = "its watchdog found no progress (rank, iteration and phase: the error above)"
        elif "To enable traceback" in msg:  # elastic's text when the worker left no record
            msg = ""
        raise WorkerFailed(f"worker failed (rank {first.local_rank}, exit {first.exitcode}): "
                           f"{msg or 'see the log above'}") from None
    finally:
        os.environ.pop(STOP_FILE_ENV, None)
        os.unlink(stop_file)


def _start_resource_tracker_immune_to(sig) -> None:
    """Start multiprocessing's resource tracker (the helper process that the agent's and the
    workers' queues and events register with) with `sig` blocked, which it inherits and keeps.
    It ignores SIGINT and SIGTERM itself, but a SIGUSR1 sent to the process group killed it; its
    replacement, started at the next semaphore's release, did not know that semaphore and printed
    a KeyError traceback for each. Does nothing if this process already runs one."""
    from multiprocessing import resource_tracker

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {sig})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class WorkerFailed(ConfigError):
    """A self-launched worker failed; reported as one line (its own output is above)."""


def signal_name(sig) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _worker_entry(worker_fn: Callable[[Any], None], arg: Any) -> None:
    from framework.training.resilience import release_after_stop

    try:
        worker_fn(arg)
    except ConfigError as e:
        # one line, no traceback from the worker; the parent reports the exit code
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    release_after_stop()  # a deliberate stop: returning ends this process, agent polling or not


# --------------------------------------------------------------------------------------------
# per rank
# --------------------------------------------------------------------------------------------
def init_distributed(cfg: Config, device: str) -> None:
    from megatron.core import parallel_state as ps

    p = cfg.parallel
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # NCCL: a timed-out collective raises (naming the op) instead of hanging forever
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=p.distributed_backend if device == "cuda" else "gloo",
            timeout=timedelta(minutes=p.distributed_timeout_minutes))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.vpp,
    )


def set_seeds(seed: int, device: str, cuda_graph: bool = False) -> None:
    """Megatron's scheme: distinct per pipeline stage; TP ranks differ through mcore's tracker
    (graph-safe generator states when layers are captured as CUDA graphs)."""
    from megatron.core import parallel_state as ps

    s = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(s, use_cudagraphable_rng=cuda_graph,
                                        force_reset_rng=cuda_graph)


def teardown() -> None:
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def worker(cfg: Config) -> None:
    """One rank's training; its console lines also go to <run dir>/train.log."""
    from framework.training.console import run_log

    with run_log(cfg.run_dir):
        _train_rank(cfg)


def _train_rank(cfg: Config) -> None:
    from megatron.core import parallel_state as ps

    from framework.models import build_model, padded_vocab_size
    from framework.optimizer import build_optimizer
    from framework.training import checkpoint as ckpt
    from framework.training.loop import Runtime, Trainer, TrainState
    from framework.training.metrics import MetricsLogger, model_flops_per_token
    from framework.training.data import build_train_data, load_run_tokenizer
    from framework.training.resilience import Watchdog, prune_checkpoints
    from framework.training.step import build_train_step
    from framework.security import mask_secrets
    from framework.training.profiling import build_profiler
    from framework.training.console import echo

    device = resolve_device(cfg.train.device)
    on_gpu = device == "cuda"
    bf16 = on_gpu if cfg.train.bf16 is None else cfg.train.bf16
    bf16 = bf16 and not cfg.train.fp16
    init_distributed(cfg, device)
    try:
        set_seeds(cfg.train.seed, device, cuda_graph=cfg.model.cuda_graph)
        rank = dist.get_rank()
        links = cfg.checkpoint.allow_symlinks
        load_dir, load_it, resuming = ckpt.load_target(cfg.checkpoint)
        resume_it = load_it if resuming else None
        tokenizer = load_run_tokenizer(cfg.data, cfg.tokenizer, load_dir,
                                       cfg.checkpoint.load_hf if resume_it is None else None,
                                       model_type=cfg.model.type, allow_symlinks=links,
                                       iteration=load_it)
        vocab = cfg.model.vocab_size or tokenizer.vocab_size
        padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                                   cfg.parallel.tensor_model_parallel_size)
        if rank == 0:
            echo(f"vocab: {vocab} tokens, padded to {padded} (+{padded - vocab}: a multiple of "
                 f"lcm(make_vocab_size_divisible_by={cfg.model.make_vocab_size_divisible_by}, "
                 f"TP={cfg.parallel.tensor_model_parallel_size}))")
            if (cfg.parallel.recompute_granularity == "selective"
                    and cfg.model.attention_backend == "sdpa"
                    and set(cfg.parallel.recompute_modules) == {"core_attn"}):
                echo("note: recompute_modules=[core_attn] saves no memory with "
                     "attention_backend=sdpa (flash / cuDNN kernels keep no seq x seq scores) "
                     "and costs time (gpt2-large on an H200: same peak memory, 11% slower); "
                     "recompute 'layernorm', or full recompute of some layers "
                     "(recompute_method=block), trades memory for time")
        data = build_train_data(cfg.data, tokenizer, cfg.train, seq_length=cfg.model.seq_length,
                                dp_rank=ps.get_data_parallel_rank(),
                                dp_size=ps.get_data_parallel_world_size(),
                                model_type=cfg.model.type,
                                decoder_seq_length=cfg.model.decoder_seq_length,
                                binary_head=cfg.model.add_binary_head)
        torch_device = torch.device(device, torch.cuda.current_device() if on_gpu else None) \
            if on_gpu else torch.device("cpu")
        model = build_model(cfg.model, cfg.parallel, vocab_size=padded, bf16=bf16,
                            fp16=cfg.train.fp16, device=torch_device, wrap_ddp=on_gpu,
                            fp8=cfg.train.fp8)
        if cfg.checkpoint.load_hf and resume_it is None:
            from framework.interop import load_hf_into_model

            # before the optimizer is built, so mixed-precision main params copy these weights
            load_hf_into_model(cfg.checkpoint.load_hf, model, cfg.model,
                               allow_pickle=cfg.checkpoint.allow_pickle)
            if rank == 0:
                echo(f"initialised weights from Hugging Face model {cfg.checkpoint.load_hf}")
        optimizer, scheduler = build_optimizer(
            cfg.optimizer, model, max_steps=cfg.train.max_steps, bf16=bf16, fp16=cfg.train.fp16,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_param_gather=cfg.parallel.overlap_param_gather, on_gpu=on_gpu)
        state = TrainState()
        if load_dir:
            from framework.training.resilience import VERIFIED_ENV

            # the launching process has checked the checksums already (preflight): sizes here
            verified = os.environ.get(VERIFIED_ENV) == ckpt.iter_dir(load_dir, load_it)
            meta = ckpt.load_checkpoint(load_dir, model, optimizer, scheduler,
                                        model_cfg=cfg.model, with_optimizer=resume_it is not None,
                                        allow_symlinks=links, iteration=load_it,
                                        verify=cfg.checkpoint.verify and not verified)
            if resume_it is not None:
                state = TrainState(step=meta["iteration"],
                                   consumed_samples=meta["consumed_samples"],
                                   skipped_iters=meta.get("skipped_iters", 0),
                                   nan_iters=meta.get("nan_iters", 0))
            if rank == 0:
                what = "resumed" if resume_it is not None else "initialised weights"
                echo(f"{what} from {ckpt.iter_dir(load_dir, meta['iteration'])} "
                     f"(step {state.step}, {state.consumed_samples} samples)")
                if cfg.checkpoint.load_iteration is not None and resume_it is not None:
                    echo(f"note: checkpoint.load_iteration={load_it} chose this checkpoint; the "
                         f"next saves replace any later ones in {load_dir}; rerun without it "
                         f"to continue from the latest")
                planned = cfg.optimizer.lr_decay_steps or max(cfg.train.max_steps, 1)
                if resume_it is not None and scheduler.lr_decay_steps != planned:
                    echo(f"note: the learning-rate schedule is the checkpoint's: it decays over "
                         f"{scheduler.lr_decay_steps} steps, then stays at optimizer.min_lr="
                         f"{cfg.optimizer.min_lr:g} (train.max_steps does not stretch it)")
        is_last = ps.is_pipeline_last_stage()
        is_logging = (is_last and ps.get_tensor_model_parallel_rank() == 0
                      and ps.get_data_parallel_rank() == 0)
        config_dict = mask_secrets(asdict(cfg))  # what is logged and stored: no secrets
        logger = MetricsLogger(cfg.run_dir, cfg.logging, config_dict,
                               resume_id_dir=cfg.checkpoint.dir) if is_logging else None
        runtime = Runtime(
            device=torch_device, dp_size=ps.get_data_parallel_world_size(),
            world_size=dist.get_world_size(), is_logging_rank=is_logging, is_last_stage=is_last,
            seq_length=cfg.model.seq_length,
            flops_per_token=model_flops_per_token(cfg.model, padded))

        def save(st: TrainState) -> None:
            path = ckpt.save_checkpoint(
                cfg.checkpoint.dir, st.step, model, optimizer, scheduler,
                consumed_samples=st.consumed_samples, config=config_dict, tokenizer=tokenizer,
                extra={"skipped_iters": st.skipped_iters, "nan_iters": st.nan_iters})
            if rank == 0:
                echo(f"saved checkpoint {path}")
                for old in prune_checkpoints(cfg.checkpoint.dir, cfg.checkpoint.keep_last):
                    echo(f"removed old checkpoint {old} (checkpoint.keep_last="
                         f"{cfg.checkpoint.keep_last})")

        step_impl = build_train_step(cfg.model.type, cfg.train.step, torch_device)
        trainer = Trainer(model, optimizer, scheduler, step_impl, data, cfg.train,
                          cfg.checkpoint, runtime, logger, save)
        # reports rank/step/phase if a phase makes no progress for train.watchdog_seconds
        # (default: the collective timeout + a grace minute), then ends the process
        watchdog = Watchdog(watchdog_seconds(cfg), rank).start()
        trainer.watchdog = watchdog
        trainer.profiler = build_profiler(cfg.train.profile, cfg.run_dir, rank, torch_device,
                                          max_steps=cfg.train.max_steps)
        try:
            trainer.fit(state)
        finally:
            watchdog.stop()
        if logger is not None:
            logger.close()
    finally:
        teardown()


def watchdog_seconds(cfg: Config) -> float:
    """train.watchdog_seconds, or the collective timeout plus a grace minute."""
    if cfg.train.watchdog_seconds is not None:
        return float(cfg.train.watchdog_seconds)
    return 60.0 * (cfg.parallel.distributed_timeout_minutes + 1)

