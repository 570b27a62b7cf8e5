"""`framework.run(cfg)`: plan the run, launch (or join) the workers, and train on every rank.

`run` makes the plan in the launching process (framework/plan.py: every decision and check that
needs no worker) and hands it to `train_worker` on every rank (framework/launch.py), which builds
the model, optimizer and data of the model family and runs the training loop.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import List, Optional

import torch
import torch.distributed as dist

from framework.checkpoint.manifest import VERIFIED_ENV
from framework.checkpoint.reader import iter_dir
from framework.checkpoint.retention import prune_checkpoints
from framework.checkpoint.state import load_checkpoint, save_checkpoint
from framework.config import Config
from framework.distributed import init_distributed, set_seeds, teardown
from framework.interop import load_hf_into_model
from framework.launch import launch
from framework.launch_env import env_rank
from framework.models.build import build_model
from framework.models.registry import family
from framework.optimizer import apply_optimizer_settings, build_optimizer
from framework.orphans import forks_die_with_this_process
from framework.plan import RunPlan, make_plan
from framework.security.masking import mask_secrets
from framework.training.console import echo, run_log
from framework.training.data import build_train_data
from framework.training.loop import Runtime, Trainer, TrainState
from framework.training.metrics import MetricsLogger, model_flops_per_token
from framework.training.oom import kept_logits_bytes, oom_error, reported_oom, size_text
from framework.training.profiling import build_profiler
from framework.training.step import build_train_step
from framework.training.summary import check_finished, print_summary
from framework.training.watchdog import SAVE_PATIENCE, Watchdog, watchdog_seconds


def run(cfg: Config, overrides: Optional[List[str]] = None) -> None:
    """Plan the run (one line and exit 2 for bad input, before any worker), then launch (or join)
    the workers. `overrides` (the command line's, from train.py) make the printed resume /
    train-longer commands exact."""
    try:
        # the lock first: the plan reads (and verifies) the checkpoint another run may be writing
        with _checkpoint_dir_lock(cfg):
            plan = make_plan(cfg)
            _run_planned(plan, overrides)
    finally:
        os.environ.pop(VERIFIED_ENV, None)


def _run_planned(plan: RunPlan, overrides: Optional[List[str]]) -> None:
    cfg = plan.cfg
    with run_log(cfg.run_dir):
        # a checkpoint already at train.max_steps: say so (exit 0); past it: an error (exit 2)
        if check_finished(cfg, overrides, show=env_rank() == 0):
            return
        # after a stop signal the workers save before they exit: give them the time the
        # watchdog gives a save, not torch elastic's 30 s before it kills them
        launch(train_worker, plan, plan.world_size,
               shutdown_s=SAVE_PATIENCE * watchdog_seconds(cfg))
        if env_rank() == 0:
            print_summary(cfg, overrides)


# settings a resume may change without changing the weights' shapes (those are refused by
# check_compatible and the vocabulary check), listed in a note when they differ from the
# checkpoint's: the run goes on, but not as the checkpoint's run would have
RESUME_NOTED = {
    "train": ("seed",),
    "model": ("seq_length", "hidden_dropout", "attention_dropout", "layernorm_epsilon",
              "rotary_percent", "rotary_base", "rope_scaling", "rope_scaling_factor",
              "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor",
              "rope_scaling_original_max_position_embeddings", "decoder_seq_length",
              "relative_attention_max_distance", "softmax_scale", "scale_decoder_output"),
    "data": ("type", "path", "split", "reset_position_ids", "reset_attention_mask",
             "eod_mask_loss", "num_documents", "masking_probability",
             "short_sequence_probability", "masking_max_ngram", "masking_do_full_word",
             "masking_do_permutation", "masking_use_longer_ngrams",
             "masking_use_geometric_distribution"),
}


def resumed_setting_changes(stored: dict, cfg: Config) -> List[str]:
    """`section.key=value (checkpoint: value)` for each RESUME_NOTED setting that differs from
    the resumed checkpoint's stored config (a key the checkpoint does not store is skipped)."""
    from framework.config import _shown

    out = []
    for section, keys in RESUME_NOTED.items():
        theirs = stored.get(section) or {}
        ours = getattr(cfg, section)
        for k in keys:
            if k in theirs and hasattr(ours, k):
                now, then = getattr(ours, k), theirs[k]
                if isinstance(now, (list, tuple)):
                    now = list(now)
                if now != then:
                    out.append(f"{section}.{k}={_shown(now)} (checkpoint: {_shown(then)})")
    return out


def _checkpoint_dir_lock(cfg: Config):
    """One run at a time saves into a checkpoint directory (framework/locking.py `run_lock`),
    held by the process that launches the workers, or by global rank 0 under torchrun/SLURM."""
    import contextlib

    from framework.locking import run_lock

    if not cfg.checkpoint.save or not cfg.checkpoint.dir or env_rank() != 0:
        return contextlib.nullcontext()
    return run_lock(cfg.checkpoint.dir)


def train_worker(plan: RunPlan) -> None:
    """One rank's training; its console lines also go to <run dir>/train.log."""
    with run_log(plan.cfg.run_dir):
        _train_rank(plan)


# model switches that only choose GPU kernels; a CPU run that was asked for one says it goes
# without it rather than ignore it silently
GPU_ONLY_SWITCHES = ("torch_compile", "cuda_graph", "bias_activation_fusion", "swiglu_kernel",
                     "qkv_rope_fusion")


def _train_rank(plan: RunPlan) -> None:
    # no checkpoint writer (a forked child) left holding the run lock after a kill -9
    with forks_die_with_this_process():
        _train_rank_in(plan)


def _train_rank_in(plan: RunPlan) -> None:
    from megatron.core import parallel_state as ps

    cfg = plan.cfg
    on_gpu = plan.device == "cuda"
    init_distributed(cfg.parallel, plan.device)
    try:
        set_seeds(cfg.train.seed, plan.device, cuda_graph=cfg.model.cuda_graph)
        rank = dist.get_rank()
        links = cfg.checkpoint.allow_symlinks
        parts = family(cfg.model.type).parts()
        tokenizer = plan.tokenizer.load()
        vocab, padded = plan.vocab_size, plan.padded_vocab_size
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu \
            else torch.device("cpu")
        if rank == 0:
            echo(f"vocab: {vocab} tokens, padded to {padded} (+{padded - vocab}: a multiple of "
                 f"lcm(make_vocab_size_divisible_by={cfg.model.make_vocab_size_divisible_by}, "
                 f"TP={cfg.parallel.tensor_model_parallel_size}))")
            gpu_only = [] if on_gpu else [f"model.{k}=true" for k in GPU_ONLY_SWITCHES
                                          if getattr(cfg.model, k) is True]
            if not on_gpu and cfg.model.flex_kernel_options:  # options of a GPU kernel
                gpu_only.append("model.flex_kernel_options")
            if gpu_only:
                echo(f"note: {', '.join(gpu_only)}: GPU-only, so this CPU run goes without "
                     f"(the same model and loss; only the kernels differ)")
            if not on_gpu and cfg.data.pin_memory:
                echo("note: data.pin_memory=true: page-locked batches speed up copies to a GPU, "
                     "so this CPU run goes without (the same batches)")
            kept = kept_logits_bytes(cfg, padded, plan.bf16 or cfg.train.fp16, device,
                                     is_last_stage=True)
            if kept and cfg.model.fused_ce_keep_logits is None:
                echo(f"note: the output layer keeps each micro-batch's logits for its backward "
                     f"({size_text(kept)} on the last pipeline stage; faster than recomputing "
                     f"them); model.fused_ce_keep_logits=false recomputes them instead")
            if (cfg.parallel.recompute_granularity == "selective"
                    and cfg.model.attention_backend == "sdpa"
                    and set(cfg.parallel.recompute_modules) == {"core_attn"}):
                echo("note: recompute_modules=[core_attn] saves no memory with "
                     "attention_backend=sdpa (flash / cuDNN kernels keep no seq x seq scores) "
                     "and costs time (the attention runs again in the backward); recompute "
                     "'layernorm', or full recompute of some layers (recompute_method=block), "
                     "trades memory for time")
        data = build_train_data(cfg.data, tokenizer, cfg.train, cfg.model, parts,
                                dp_rank=ps.get_data_parallel_rank(),
                                dp_size=ps.get_data_parallel_world_size(), on_gpu=on_gpu)
        one_micro = cfg.train.global_batch_size == \
            cfg.train.micro_batch_size * ps.get_data_parallel_world_size()
        model = build_model(cfg.model, cfg.parallel, vocab_size=padded, bf16=plan.bf16,
                            fp16=cfg.train.fp16, device=device, wrap_ddp=on_gpu,
                            fp8=cfg.train.fp8, fp8_wgrad_overwrite=one_micro)
        if plan.load_hf:
            # before the optimizer is built, so mixed-precision main params copy these weights
            load_hf_into_model(plan.load_hf, model, cfg.model,
                               allow_pickle=cfg.checkpoint.allow_pickle)
            if rank == 0:
                echo(f"initialised weights from Hugging Face model {plan.load_hf}")
        optimizer, scheduler = build_optimizer(
            cfg.optimizer, model, max_steps=cfg.train.max_steps, bf16=plan.bf16,
            fp16=cfg.train.fp16, use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_param_gather=cfg.parallel.overlap_param_gather, on_gpu=on_gpu)
        fused = getattr(optimizer, "fused_adam_groups", None)
        if fused is not None and rank == 0:
            # what benchmarks/ read back as the optimizer that really ran
            echo(f"optimizer: torch's fused AdamW kernel in {fused[0]} of {fused[1]} param groups")
        state = TrainState()
        if plan.load_dir:
            # the launching process has checked the checksums already (the plan): sizes here
            verified = os.environ.get(VERIFIED_ENV) == iter_dir(plan.load_dir,
                                                                plan.load_iteration)
            meta = load_checkpoint(plan.load_dir, model, optimizer, scheduler,
                                   model_cfg=cfg.model, with_optimizer=plan.resuming,
                                   allow_symlinks=links, iteration=plan.load_iteration,
                                   verify=cfg.checkpoint.verify and not verified)
            if plan.resuming and cfg.optimizer.override_on_resume:
                changed = apply_optimizer_settings(optimizer, scheduler, cfg.optimizer,
                                                   max_steps=cfg.train.max_steps,
                                                   stored=meta.get("config", {}).get("optimizer"))
                if rank == 0 and changed:
                    echo(f"note: optimizer.override_on_resume=true: continuing with "
                         f"{', '.join(changed)} (the checkpoint's moments kept)")
            if plan.resuming:
                state = TrainState(step=meta["iteration"],
                                   consumed_samples=meta["consumed_samples"],
                                   skipped_iters=meta.get("skipped_iters", 0),
                                   nan_iters=meta.get("nan_iters", 0))
            if rank == 0:
                what = "resumed" if plan.resuming else "initialised weights"
                echo(f"{what} from {iter_dir(plan.load_dir, meta['iteration'])} "
                     f"(step {state.step}, {state.consumed_samples} samples)")
                moved = resumed_setting_changes(meta.get("config", {}), cfg) \
                    if plan.resuming else []
                if moved:
                    echo(f"note: resuming with settings the checkpoint was not trained with: "
                         f"{'; '.join(moved)} (the data position, "
                         f"{state.consumed_samples} samples, is the checkpoint's, and so are the "
                         f"random-number states at the same layout)")
                # (a fine-tune resumed by its own command stored the same load: nothing new)
                stored_ck = meta.get("config", {}).get("checkpoint") or {}
                ignored = [f"checkpoint.{k}={v}" for k, v in (
                    ("load", cfg.checkpoint.load), ("load_hf", cfg.checkpoint.load_hf))
                    if v and stored_ck.get(k) != v]
                if plan.resuming and ignored:
                    echo(f"note: {' and '.join(ignored)} not used: a checkpoint in "
                         f"checkpoint.dir={cfg.checkpoint.dir} is resumed instead (a resume "
                         f"comes first); give a new checkpoint.dir to start from "
                         f"{'it' if len(ignored) == 1 else 'them'}")
                if cfg.checkpoint.load_iteration is not None and plan.resuming:
                    echo(f"note: checkpoint.load_iteration={plan.load_iteration} chose this "
                         f"checkpoint; the next saves replace any later ones in "
                         f"{plan.load_dir}; rerun without it to continue from the latest")
                stored_gbs = meta.get("config", {}).get("train", {}).get("global_batch_size")
                if plan.resuming and stored_gbs not in (None, cfg.train.global_batch_size):
                    echo(f"note: train.global_batch_size is {cfg.train.global_batch_size}; the "
                         f"checkpoint trained with {stored_gbs} (each step now takes "
                         f"{cfg.train.global_batch_size} samples)")
                planned = cfg.optimizer.lr_decay_steps or max(cfg.train.max_steps, 1)
                if plan.resuming and scheduler.lr_decay_steps != planned:
                    # (scheduler.min_lr: the checkpoint's, which it keeps)
                    echo(f"note: the learning-rate schedule is the checkpoint's: it decays over "
                         f"{scheduler.lr_decay_steps} steps, then stays at its min_lr "
                         f"{scheduler.min_lr:g} (train.max_steps does not stretch it; "
                         f"optimizer.override_on_resume=true does)")
        if rank == 0 and cfg.optimizer.override_on_resume and not plan.resuming:
            echo("note: optimizer.override_on_resume=true has no effect: this run resumes no "
                 "checkpoint")
        # (from the final scheduler: after a resume it is the checkpoint's, or the override's)
        if rank == 0 and scheduler.lr_warmup_steps < cfg.optimizer.lr_warmup_steps and \
                not (plan.resuming and not cfg.optimizer.override_on_resume):
            echo(f"note: optimizer.lr_warmup_steps={cfg.optimizer.lr_warmup_steps} is capped at "
                 f"{scheduler.lr_warmup_steps}: warm-up ends before the decay's last step "
                 f"({scheduler.lr_decay_steps}, optimizer.lr_decay_steps or train.max_steps)")
        is_last = ps.is_pipeline_last_stage()
        is_logging = (is_last and ps.get_tensor_model_parallel_rank() == 0
                      and ps.get_data_parallel_rank() == 0)
        config_dict = mask_secrets(asdict(cfg))  # what is logged and stored: no secrets
        logger = MetricsLogger(cfg.run_dir, cfg.logging, config_dict,
                               resume_id_dir=cfg.checkpoint.dir) if is_logging else None
        runtime = Runtime(
            device=device, dp_size=ps.get_data_parallel_world_size(),
            world_size=dist.get_world_size(), is_logging_rank=is_logging, is_last_stage=is_last,
            seq_length=cfg.model.seq_length,
            flops_per_token=model_flops_per_token(cfg.model, padded))

        def save(st: TrainState) -> None:
            path = save_checkpoint(
                cfg.checkpoint.dir, st.step, model, optimizer, scheduler,
                consumed_samples=st.consumed_samples, config=config_dict, tokenizer=tokenizer,
                extra={"skipped_iters": st.skipped_iters, "nan_iters": st.nan_iters})
            if rank == 0:
                echo(f"saved checkpoint {path}")
                kept: list = []
                for old in prune_checkpoints(cfg.checkpoint.dir, cfg.checkpoint.keep_last, kept):
                    echo(f"removed old checkpoint {old} (checkpoint.keep_last="
                         f"{cfg.checkpoint.keep_last})")
                for old in kept:
                    echo(f"warning: could not remove old checkpoint {old} (checkpoint.keep_last="
                         f"{cfg.checkpoint.keep_last}): check its permissions")

        step_impl = build_train_step(parts.train_step, cfg.train.step, device)
        trainer = Trainer(model, optimizer, scheduler, step_impl, data, cfg.train,
                          cfg.checkpoint, runtime, logger, save)
        # reports rank/step/phase if a phase makes no progress for train.watchdog_seconds
        # (default: the collective timeout + a grace minute), then ends the process
        watchdog = Watchdog(watchdog_seconds(cfg), rank).start()
        trainer.watchdog = watchdog
        trainer.profiler = build_profiler(cfg.train.profile, cfg.run_dir, rank, device,
                                          max_steps=cfg.train.max_steps)
        # out of memory: one line naming the settings that would fit, instead of a schedule's
        # traceback; the step and phase are the watchdog's last mark (an eval or a save comes
        # after the step count has moved on)
        def oom(e: BaseException):
            return oom_error(e, cfg, step=watchdog.step, phase=watchdog.phase, rank=rank,
                             padded_vocab=padded, half=plan.bf16 or cfg.train.fp16,
                             device=device, is_last_stage=is_last,
                             dp_size=ps.get_data_parallel_world_size(), done_steps=state.step)

        try:
            with reported_oom(oom, dist.get_world_size(), trainer.profiler, logger):
                trainer.fit(state)
        finally:
            watchdog.stop()
        if logger is not None:
            logger.close()
    finally:
        teardown()
