"""Inference from a checkpoint: load a trained model at any TP/PP, and `generate.py`'s work.

* `load_for_inference(...)` builds this rank's chunks from a checkpoint's stored model config
  (framework.json) with sequence parallelism and recompute off, and loads the weights (mcore's
  dist checkpoint reshards them to the current TP/PP).
* `GenerateConfig` is the schema of conf/generate.yaml: the decoding options of
  `framework.generation.GenerationOptions` plus where the model, tokenizer and prompts come from.
* `run_generate(cfg)` checks everything it can before any process group or model exists
  (prompts, their lengths, the layout), then starts the workers through
  `framework.launch.launch`.
  Each data-parallel rank serves its share of the prompts; rank 0 prints and writes the results.
"""
from __future__ import annotations

import json
import os
import stat
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Dict, List, Optional, Tuple

import torch

from framework.checkpoint import reader
from framework.checkpoint.manifest import VERIFIED_ENV, verify_before_launch
from framework.checkpoint.state import load_checkpoint
from framework.config import ModelConfig, ParallelConfig, TokenizerConfig
from framework.distributed import init_distributed, set_seeds, teardown
from framework.errors import ConfigError, require
from framework.generation import MAX_SEED, GenerationOptions, generate, normalize_early_stopping
from framework.launch import launch, resolve_device
from framework.paths import inside, unwritable_dir
from framework.models.registry import family, with_capability
from framework.tokenizer import TokenizerSource, choose_tokenizer, vocab_difference
from framework.training.oom import generation_oom_error, reported_oom

NUM_HELDOUT = 200  # conf/generate.yaml's num_heldout


@dataclass
class GenerateConfig(GenerationOptions):
    """conf/generate.yaml. The decoding options are the inherited top-level fields."""

    load: Optional[str] = None  # checkpoint dir; None -> checkpoints/default under the launch dir
    iteration: Optional[int] = None  # None -> the latest committed checkpoint
    prompts: Optional[List[str]] = None  # None -> held-out arithmetic (data=embedded checkpoints)
    output_file: Optional[str] = None  # JSONL: one object per prompt
    add_bos: bool = False
    batch_size: int = 32  # prompts decoded together
    num_heldout: int = NUM_HELDOUT  # held-out arithmetic problems when no prompts are given
    device: str = "auto"  # auto | cuda | cpu
    bf16: Optional[bool] = None  # None -> bf16 on GPU, fp32 on CPU
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # None -> the checkpoint's TP/PP (DP 1); else e.g. parallel=tp2 (DP = parallel's or 1)
    parallel: Optional[ParallelConfig] = None
    # follow symlinks inside the checkpoint (refused by default: a checkpoint is a closed tree)
    allow_symlinks: bool = False
    verify: bool = True  # check the checksums in the checkpoint's manifest.json (sizes: always)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.prompts is None or len(self.prompts) > 0,
                 "prompts=[] is empty: give at least one prompt, e.g. prompts='[\"12+35=\"]'")
        require(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        require(self.num_heldout >= 1, f"num_heldout={self.num_heldout} must be >= 1")
        require(self.iteration is None or self.iteration >= 0,
                 f"iteration={self.iteration} must be >= 0 (null: the latest checkpoint)")
        require(self.device in ("auto", "cuda", "cpu"),
                 f"device={self.device!r} is not one of ['auto', 'cuda', 'cpu']")
        self.check_settings_take_effect()

    def check_settings_take_effect(self) -> None:
        """A setting moved off its default must act on this run: each one that the other
        settings would leave unused is refused in one line. (`framework.generation.generate`
        itself accepts these combinations; generate.py's settings are what a user typed.)"""
        k, p = self.top_k, self.top_p
        require(k != 1 or p == 0.0,
                 f"top_p={p} has no effect with top_k=1 (one token is kept: greedy decoding); "
                 f"set top_k=0 for top-p sampling, or top_p=0.0")
        require(self.num_beams > 1 or k > 1 or p > 0.0 or self.temperature == 1.0,
                 f"temperature={self.temperature} has no effect with greedy decoding (top_k={k}, "
                 f"top_p={p}); sample with top_k > 1 or top_p > 0, or leave temperature=1.0")
        require(self.top_p_decay == 0.0 or p > 0.0,
                 f"top_p_decay={self.top_p_decay} has no effect with top_p=0.0 (it decays top_p "
                 f"after each token); set top_p > 0 to sample, or top_p_decay=0.0")
        require(self.top_p_bound == 0.0 or self.top_p_decay > 0.0,
                 f"top_p_bound={self.top_p_bound} has no effect with top_p_decay=0.0 (it is the "
                 f"floor of a decaying top_p); set top_p_decay in (0, 1], or top_p_bound=0.0")
        require(self.num_beams > 1 or self.length_penalty == 1.0,
                 f"length_penalty={self.length_penalty} only acts in beam search; set "
                 f"num_beams > 1, or leave length_penalty=1.0")
        require(self.num_beams > 1 or normalize_early_stopping(self.early_stopping) is False,
                 f"early_stopping={str(self.early_stopping).lower()} only acts in beam search; "
                 f"set num_beams > 1, or leave early_stopping=false")
        if self.decode_cuda_graph:  # the static decode step: lean, cached, one beam
            for ok, why in ((self.num_beams == 1, f"beam search (num_beams={self.num_beams}) "
                                                   f"decodes eagerly"),
                            (self.use_cache, "it replays KV-cache steps (use_cache=false)"),
                            (self.lean_decode, "it captures the lean decode step "
                                               "(lean_decode=false)")):
                require(ok, f"decode_cuda_graph=true has no effect here: {why}; leave "
                            f"decode_cuda_graph unset (null)")
        require(not self.return_logprobs or self.output_file is not None,
                 "return_logprobs=true needs output_file=<file.jsonl>: the log-probabilities "
                 "are written there (the console shows completions only)")
        require(self.prompts is None or self.num_heldout == NUM_HELDOUT,
                 f"num_heldout={self.num_heldout} has no effect with prompts given (it counts "
                 f"the held-out arithmetic problems asked without prompts); drop num_heldout")

    def options(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(GenerationOptions)}


def register_generate_config() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


# --------------------------------------------------------------------------------------------
# what a checkpoint says
# --------------------------------------------------------------------------------------------
def inference_layout(parallel: ParallelConfig) -> Tuple[ParallelConfig, List[str]]:
    """A copy of `parallel` as generation runs it, and log lines about what was switched off:
    no sequence parallelism (a one-token decode step cannot be split along the sequence), no
    recompute (no backward pass), one chunk per pipeline stage, no gradient or optimizer
    options."""
    p = ParallelConfig(**asdict(parallel))
    notes = []
    if p.sequence_parallel:
        notes.append("generation: sequence parallelism is switched off (a one-token decode step "
                     "cannot be split along the sequence)")
        p.sequence_parallel = False
    if p.recompute_granularity is not None:
        notes.append(f"generation: recompute_granularity={p.recompute_granularity} is switched "
                     f"off (no backward pass)")
        p.recompute_granularity, p.recompute_method = None, None
    default = ParallelConfig()
    recompute = [f"parallel.{f}={getattr(p, f)}" for f in ("recompute_method",
                                                           "recompute_num_layers",
                                                           "recompute_modules")
                 if getattr(p, f) != getattr(default, f)]
    if recompute:
        notes.append(f"generation: {', '.join(recompute)} not used (no backward pass, nothing "
                     f"to recompute)")
        for f in ("recompute_method", "recompute_num_layers", "recompute_modules"):
            setattr(p, f, getattr(default, f))
    if p.vpp:
        notes.append("generation: virtual pipeline stages are not used (one chunk per stage)")
    p.virtual_pipeline_model_parallel_size = None
    training = [f"parallel.{f}=true" for f in ("use_distributed_optimizer", "overlap_grad_reduce",
                                               "overlap_param_gather") if getattr(p, f)]
    if training:
        notes.append(f"generation: {', '.join(training)} switched off (no gradients or "
                     f"optimizer)")
    p.use_distributed_optimizer = p.overlap_grad_reduce = p.overlap_param_gather = False
    if p.overlap_p2p_comm is not None:
        notes.append(f"generation: parallel.overlap_p2p_comm={str(p.overlap_p2p_comm).lower()} "
                     f"is not used (generation sends activations between stages itself)")
        p.overlap_p2p_comm = None
    return p, notes


def inference_parallel(meta: Dict[str, Any], override: Optional[ParallelConfig]
                       ) -> Tuple[ParallelConfig, List[str]]:
    """The layout to generate with (`override`, else the checkpoint's TP/PP with DP 1), and log
    lines about what was switched off."""
    if override is not None:
        p = override
    else:
        stored = meta.get("config", {}).get("parallel", {})
        p = ParallelConfig(
            name="from-checkpoint",
            tensor_model_parallel_size=stored.get("tensor_model_parallel_size", 1),
            pipeline_model_parallel_size=stored.get("pipeline_model_parallel_size", 1),
            distributed_backend=stored.get("distributed_backend", "nccl"))
    p, notes = inference_layout(p)
    p.data_parallel_size = p.data_parallel_size or 1
    return p, notes


def checkpoint_vocab(meta: Dict[str, Any], model_cfg: ModelConfig, tokenizer) -> Tuple[int, int]:
    """(real, padded) vocabulary size of the checkpoint: padded with the TP it was trained at."""
    from framework.models.build import padded_vocab_size  # (megatron-core: imported on use)

    real = model_cfg.vocab_size or tokenizer.vocab_size
    train_tp = meta.get("config", {}).get("parallel", {}).get("tensor_model_parallel_size", 1)
    return real, padded_vocab_size(real, model_cfg.make_vocab_size_divisible_by, train_tp)


def choose_checkpoint_tokenizer(tok_cfg: TokenizerConfig, load_dir: str, iteration: int,
                                model_cfg: ModelConfig, data_type: Optional[str]
                                ) -> TokenizerSource:
    """tokenizer.path / vocab_file+merge_file, else the checkpoint's tokenizer/, else (for a
    data=embedded run) the model family's embedded tokenizer (`framework.tokenizer.
    choose_tokenizer`, the rule train.py follows too)."""
    where = reader.iter_dir(load_dir, iteration)
    embedded = family(model_cfg.type).parts().embedded_tokenizer \
        if data_type == "embedded" else None
    return choose_tokenizer(tok_cfg, checkpoint_iter_dir=where, embedded=embedded,
                            missing=f"{where} has no tokenizer/ directory: set tokenizer.path or "
                                    f"tokenizer.vocab_file + tokenizer.merge_file")


def load_for_inference(load_dir: str, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, *,
                       padded_vocab: int, device: torch.device, bf16: bool,
                       iteration: Optional[int] = None, allow_symlinks: bool = False,
                       verify: bool = True) -> List[torch.nn.Module]:
    """Build this rank's chunks (no DDP, SP and recompute off) and load the checkpoint's weights.
    Needs megatron's parallel state initialised for `parallel_cfg`. The checkpoint is read
    safely (`framework.checkpoint.reader`): no pickled code runs, and a damaged or
    mismatching checkpoint raises a one-line CheckpointError (a ConfigError)."""
    from framework.models.build import build_model  # (megatron-core: imported on use)

    p, _notes = inference_layout(parallel_cfg)
    # training-only speed options off: the decoder's shapes change every step
    model_cfg = replace(model_cfg, cuda_graph=False, torch_compile=False)
    model = build_model(model_cfg, p, vocab_size=padded_vocab, bf16=bf16, fp16=False,
                        device=device, wrap_ddp=False)
    load_checkpoint(load_dir, model, None, None, model_cfg=model_cfg, iteration=iteration,
                    with_optimizer=False, allow_symlinks=allow_symlinks, verify=verify,
                    how_to_load=lambda it, _path: f"iteration={it}")
    for m in model:
        m.eval()
    return model


# --------------------------------------------------------------------------------------------
# generate.py
# --------------------------------------------------------------------------------------------
@dataclass
class GenerateJob:
    """Everything a worker needs, resolved and checked before launch (pickled to workers)."""

    cfg: GenerateConfig
    parallel: ParallelConfig
    model: ModelConfig
    load: str
    iteration: int
    device: str
    bf16: bool
    prompts: List[str]
    prompt_ids: List[List[int]]
    answers: Optional[List[str]]
    data_type: Optional[str]
    tokenizer: TokenizerSource
    vocab_size: int
    padded_vocab: int
    eos_id: int
    pad_id: int
    max_new_tokens: int
    notes: List[str]
    verified: bool = False  # checksums checked by prepare_job: the workers check sizes only


def prepare_job(cfg: GenerateConfig) -> GenerateJob:
    """Resolve the checkpoint, layout, tokenizer and prompts; every check before any model work."""
    require(cfg.load is not None, "load=<checkpoint dir> is required")
    links = cfg.allow_symlinks
    it = cfg.iteration if cfg.iteration is not None else \
        reader.latest_iteration(cfg.load, allow_symlinks=links)
    require(it is not None, f"load={cfg.load} has no committed checkpoint (no "
                             f"{reader.TRACKER}); train one first (python train.py) or pass "
                             f"load=<checkpoint dir>")
    require(os.path.isfile(os.path.join(reader.iter_dir(cfg.load, it), reader.META)),
             f"load={cfg.load} iteration={it}: {reader.iter_dir(cfg.load, it)} is missing")
    meta = reader.read_meta(cfg.load, it, allow_symlinks=links)
    # the files against the manifest, before any worker builds a model
    verified = verify_before_launch(reader.iter_dir(cfg.load, it), it, meta, verify=cfg.verify,
                                    allow_symlinks=links,
                                    how_to_load=lambda i, _path: f"iteration={i}")
    model_cfg = reader.stored_model_config(meta, reader.iter_dir(cfg.load, it))
    require(family(model_cfg.type).generation,
             f"load={cfg.load} holds a model.type={model_cfg.type} model; generation supports "
             f"causal LM checkpoints only (model.type={'/'.join(with_capability('generation'))})")
    parallel, notes = inference_parallel(meta, cfg.parallel)
    device = resolve_device(cfg.device, key="device")
    on_gpu = device == "cuda"
    require(on_gpu or parallel.distributed_backend in ("nccl", "gloo"),
             f"parallel.distributed_backend={parallel.distributed_backend} has no effect on the "
             f"CPU (generation there always uses gloo): unset it")
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    require(model_cfg.num_attention_heads % tp == 0,
             f"model.num_attention_heads={model_cfg.num_attention_heads} (from the checkpoint) is "
             f"not divisible by parallel.tensor_model_parallel_size={tp}")
    require(model_cfg.num_layers % pp == 0,
             f"model.num_layers={model_cfg.num_layers} (from the checkpoint) is not divisible by "
             f"parallel.pipeline_model_parallel_size={pp}")
    require(on_gpu or pp == 1 or not model_cfg.share_embeddings_and_output_weights,
             f"parallel.pipeline_model_parallel_size={pp} needs GPUs for a model with tied "
             f"embeddings (megatron-core moves the tied output weight to CUDA); on a CPU a "
             f"layout without PP works: `parallel=tp2` or `parallel=single`")
    world = parallel.model_parallel_size * parallel.data_parallel_size
    require(not on_gpu or "WORLD_SIZE" in os.environ or world <= torch.cuda.device_count(),
             f"the layout needs {world} GPUs (TP x PP x DP) but {torch.cuda.device_count()} "
             f"are visible")
    bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    require(on_gpu or not bf16, "bf16=true needs a GPU; CPU generation runs in fp32: "
                                "`bf16=false` (or leave bf16 unset) works here")

    require(not cfg.decode_cuda_graph or pp == 1,
             f"decode_cuda_graph=true has no effect at parallel.pipeline_model_parallel_size={pp} "
             f"(the captured decode step is one pipeline stage's); leave decode_cuda_graph unset "
             f"(null)")
    require(cfg.seed is None or cfg.seed + 100 * (pp - 1) <= MAX_SEED,
             f"seed={cfg.seed} must be at most {MAX_SEED - 100 * (pp - 1)} at "
             f"parallel.pipeline_model_parallel_size={pp} (each stage seeds with seed + 100 x "
             f"its rank)")
    if cfg.output_file is not None:
        check_output_file(cfg.output_file, cfg.load)

    data_type = meta.get("config", {}).get("data", {}).get("type")
    if "hf_source" in meta:
        # imported from Hugging Face: `convert` stores a default config, whose data group says
        # embedded, but those weights never saw that corpus or its tokenizer
        data_type = None
        require(cfg.tokenizer.path or cfg.tokenizer.vocab_file or os.path.isdir(
                    os.path.join(reader.iter_dir(cfg.load, it), "tokenizer")),
                f"{cfg.load} was imported from Hugging Face without its tokenizer: set "
                f"tokenizer.path to the Hugging Face model's directory (or its tokenizer's)")
    source = choose_checkpoint_tokenizer(cfg.tokenizer, cfg.load, it, model_cfg, data_type)
    tokenizer = source.load()
    vocab, padded = checkpoint_vocab(meta, model_cfg, tokenizer)
    require(cfg.num_beams <= vocab,
             f"num_beams={cfg.num_beams} is more than the {vocab} tokens of the vocabulary: "
             f"beam search keeps at most one beam per token after the first step; use at most "
             f"{vocab}")
    check_tokenizer_fits(cfg, it, model_cfg, data_type, tokenizer, padded)
    require(padded % tp == 0,
             f"the checkpoint's padded vocabulary ({padded}) is not divisible by "
             f"parallel.tensor_model_parallel_size={tp}")
    answers = None
    if cfg.prompts is None:
        require(data_type == "embedded",
                 "no prompts given: pass prompts='[\"first\", \"second\"]' (held-out evaluation "
                 "runs without prompts only for checkpoints trained on data=embedded)")
        from framework.data.embedded import heldout_problems

        try:
            pairs = heldout_problems(cfg.num_heldout)
        except ValueError as e:  # more than there are
            there = re.search(r"\[0, (\d+)\]", str(e))
            raise ConfigError(f"num_heldout={cfg.num_heldout} is more than the held-out "
                              f"arithmetic problems there are"
                              f"{f' ({there.group(1)})' if there else ''}") from None
        prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    else:
        prompts = [str(p) for p in cfg.prompts]
    prompt_ids = []
    context = model_cfg.max_positions
    # an id of its own for unknown text (a word-level vocabulary such as the embedded corpus's
    # characters); byte-level BPE, which encodes any text, maps its unk to EOS, so not counted
    unk = getattr(getattr(tokenizer, "hf", None), "unk_token_id", None)
    if unk in (tokenizer.eod, tokenizer.bos, tokenizer.pad):
        unk = None
    for i, text in enumerate(prompts):
        check_utf8(text, f"prompt {i}")
        ids = ([tokenizer.bos] if cfg.add_bos else []) + tokenizer.encode(text)
        if unk is not None and unk in ids:
            notes.append(f"generation: prompt {i} has {ids.count(unk)} token(s) that the tokenizer "
                         f"({_tokenizer_name(cfg)}) does not know; the model gets its unknown "
                         f"token there, so the completion may mean little")
        require(len(ids) > 0, f"prompt {i} ({text!r}) has no tokens (set add_bos=true to start "
                               f"from BOS alone)")
        require(len(ids) <= context,
                 f"prompt {i} is {len(ids)} tokens long but the model's context is {context} "
                 f"positions (model.max_position_embeddings / seq_length)")
        prompt_ids.append(ids)
    longest = max(len(ids) for ids in prompt_ids)
    room = context - longest + 1
    if cfg.max_new_tokens is not None:
        max_new = min(cfg.max_new_tokens, room)
        if max_new < cfg.max_new_tokens:
            notes.append(f"generation: max_new_tokens={cfg.max_new_tokens} capped to {max_new}: "
                         f"the longest prompt ({longest} tokens) fills the rest of the "
                         f"{context}-position context")
    elif answers is not None:  # held-out arithmetic: the longest answer and its newline
        max_new = min(room, max(len(tokenizer.encode(a)) for a in answers) + 1)
    else:  # null: until EOS or the end of the context
        max_new = room
    # data=embedded trains each answer up to its newline and nothing after it (the loss is on
    # answers only), so a completion ends at the end of its line
    # (not a checkpoint imported from Hugging Face: `convert` stores a default config, whose data
    # group says embedded, but those weights were never trained on that corpus)
    trained_embedded = data_type == "embedded"  # (None for an import: see above)
    newline = tokenizer.encode("\n") if trained_embedded else [tokenizer.eod]
    require(len(newline) > 0,
             f"the tokenizer ({_tokenizer_name(cfg)}) has no token for a newline, which ends a "
             f"completion of this data=embedded checkpoint; use the checkpoint's own tokenizer")
    eos = newline[0]
    return GenerateJob(cfg=cfg, parallel=parallel, model=model_cfg, load=cfg.load, iteration=it,
                       device=device, bf16=bf16, prompts=prompts, prompt_ids=prompt_ids,
                       answers=answers, data_type=data_type, tokenizer=source,
                       vocab_size=vocab, padded_vocab=padded,
                       eos_id=eos, pad_id=tokenizer.pad, max_new_tokens=max_new,
                       notes=notes, verified=verified)


def _tokenizer_name(cfg: GenerateConfig) -> str:
    t = cfg.tokenizer
    if t.path:
        return f"tokenizer.path={t.path}"
    if t.vocab_file or t.merge_file:
        return f"tokenizer.vocab_file={t.vocab_file} + tokenizer.merge_file={t.merge_file}"
    return "the checkpoint's own"


def check_utf8(text: str, what: str) -> None:
    """A prompt from the command line is decoded with Python's surrogateescape: bytes that are
    not UTF-8 arrive as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what_char = (f"byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff
                     else f"lone surrogate \\u{code:04x}")
        raise ConfigError(f"{what} is not valid UTF-8 text ({what_char} at character "
                          f"{e.start + 1}); pass prompts as UTF-8") from None


def check_output_file(path: str, load: Optional[str] = None) -> None:
    """output_file can be written: not a directory, not inside the checkpoint directory `load`
    (where it could replace one of the checkpoint's own files), and its directory (or the nearest
    existing one above it, where it will be made) accepts a new file. Checked before any model
    work."""
    require(not os.path.isdir(path), f"output_file={path} is a directory; give a file name, "
                                     f"e.g. output_file=results.jsonl")
    # the results replace a regular file; a symlink is written through (`write_jsonl`), so
    # the link stays and its target is what gets replaced
    real = os.path.realpath(path)
    require(not os.path.exists(real) or stat.S_ISREG(os.stat(real).st_mode),
            f"output_file={path} exists and is not a regular file (a FIFO, device or socket), "
            f"which the results would replace; give a file name")
    require(load is None or not inside(path, load),
            f"output_file={path} is inside the checkpoint directory load={load}; write it "
            f"elsewhere (a file there could replace one of the checkpoint's own)")
    problem = unwritable_dir(os.path.dirname(real))
    require(problem is None, f"output_file={path}: cannot write there ({problem})")


def _stored_vocab_rows(load: str, it: int, allow_symlinks: bool) -> Optional[int]:
    """Rows of the stored word embeddings (the padded vocabulary), from the checkpoint's
    metadata; None when it has no such tensor."""
    md = reader.read_dist(reader.iter_dir(load, it), "metadata", allow_symlinks=allow_symlinks)
    have = md.state_dict_metadata.get("embedding.word_embeddings.weight")
    size = getattr(have, "size", None)
    return int(size[0]) if size else None


def check_tokenizer_fits(cfg: GenerateConfig, it: int, model_cfg: ModelConfig,
                         data_type: Optional[str], tokenizer, padded: int) -> None:
    """The tokenizer is the one the checkpoint was trained with, as far as can be told before
    loading: megatron-core loads the vocabulary tensors whatever their rows (a padded vocabulary
    may change), so a tokenizer of another size would load and decode garbage (ids past the
    trained rows, or rows cut off)."""
    name = _tokenizer_name(cfg)
    given = bool(cfg.tokenizer.path or cfg.tokenizer.vocab_file or cfg.tokenizer.merge_file)
    if given and model_cfg.vocab_size is not None:
        require(tokenizer.vocab_size <= model_cfg.vocab_size,
                 f"{name} has {tokenizer.vocab_size} tokens but the checkpoint's vocabulary is "
                 f"{model_cfg.vocab_size} (model.vocab_size): its ids would reach rows the model "
                 f"never trained; use the checkpoint's own tokenizer")
    if given:
        try:
            own = choose_checkpoint_tokenizer(TokenizerConfig(), cfg.load, it, model_cfg,
                                              data_type).load()
        except ConfigError:  # no tokenizer saved with it: the stored rows below decide
            own = None
        if own is not None and model_cfg.vocab_size is None:
            require(tokenizer.vocab_size == own.vocab_size,
                     f"{name} has {tokenizer.vocab_size} tokens but the checkpoint was trained "
                     f"with a tokenizer of {own.vocab_size}; leave tokenizer unset to use the "
                     f"checkpoint's own")
        if own is not None:
            # the same size with other ids (a permuted vocabulary) decoded wrong text; one that
            # only adds tokens passes where the sizes allow it
            try:
                moved = vocab_difference(tokenizer, own, moved_only=True)
            except Exception:  # noqa: BLE001 (a tokenizer without a vocabulary to compare)
                moved = None
            require(moved is None,
                     f"{name} is not the tokenizer the checkpoint was trained with: {moved}; "
                     f"leave tokenizer unset to use the checkpoint's own")
    rows = _stored_vocab_rows(cfg.load, it, cfg.allow_symlinks)
    require(rows is None or rows == padded,
             f"the checkpoint's word embeddings have {rows} rows but the tokenizer ({name}, "
             f"{tokenizer.vocab_size} tokens) pads to {padded}: it is not the tokenizer the "
             f"checkpoint was trained with")


def run_generate(cfg: GenerateConfig) -> None:
    job = prepare_job(cfg)
    world = job.parallel.model_parallel_size * job.parallel.data_parallel_size
    # prepare_job has checked the files (and said so of a checkpoint without a manifest)
    os.environ[VERIFIED_ENV] = reader.iter_dir(job.load, job.iteration)
    try:
        launch(generate_worker, job, world, saves=False)
    finally:
        os.environ.pop(VERIFIED_ENV, None)


def generate_worker(job: GenerateJob) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    on_gpu = job.device == "cuda"
    init_distributed(job.parallel, job.device)
    try:
        rank = dist.get_rank()
        if dist.get_world_size() != job.parallel.model_parallel_size * \
                job.parallel.data_parallel_size:
            raise ConfigError(f"world size {dist.get_world_size()} does not match TP x PP x DP = "
                              f"{job.parallel.model_parallel_size} x "
                              f"{job.parallel.data_parallel_size}")
        set_seeds(job.cfg.seed or 0, job.device)
        if rank == 0:
            for note in job.notes:
                print(note, flush=True)
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else \
            torch.device("cpu")
        model = load_for_inference(job.load, job.model, job.parallel,
                                   padded_vocab=job.padded_vocab, device=device, bf16=job.bf16,
                                   iteration=job.iteration, allow_symlinks=job.cfg.allow_symlinks,
                                   verify=job.cfg.verify and not job.verified)
        if rank == 0:
            print(f"loaded {job.load} (iteration {job.iteration}) at TP="
                  f"{job.parallel.tensor_model_parallel_size} PP="
                  f"{job.parallel.pipeline_model_parallel_size} DP="
                  f"{job.parallel.data_parallel_size}, {'bf16' if job.bf16 else 'fp32'}",
                  flush=True)
            note = decode_graph_note(job.cfg, model)
            if note:
                print(note, flush=True)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = list(range(dp_rank, len(job.prompts), dp))  # this DP rank's prompts
        opts = job.cfg.options()
        opts["max_new_tokens"] = job.max_new_tokens
        results = {}
        for start in range(0, len(mine), job.cfg.batch_size):
            idx = mine[start:start + job.cfg.batch_size]
            longest = max(len(job.prompt_ids[i]) for i in idx)
            with reported_oom(lambda e: generation_oom_error(
                    e, job.cfg, rank=rank, prompts=len(idx), longest_prompt=longest,
                    max_new_tokens=job.max_new_tokens), dist.get_world_size()):
                out = generate(model, [job.prompt_ids[i] for i in idx], eos_id=job.eos_id,
                               pad_id=job.pad_id, vocab_size=job.vocab_size, **opts)
            tokens, logprobs = out if job.cfg.return_logprobs else (out, None)
            # the prompts are left-padded to the longest one; the new tokens follow
            new = tokens[:, longest:]
            for row, i in enumerate(idx):
                gen = new[row].tolist()
                cut = gen.index(job.eos_id) + 1 if job.eos_id in gen else len(gen)
                rec = {"tokens": gen[:cut]}
                if logprobs is not None:
                    rec["logprobs"] = [round(float(x), 6) for x in logprobs[row, :cut]]
                results[i] = rec
        if dp > 1:
            gathered: List[Any] = [None] * dp
            dist.all_gather_object(gathered, results, group=ps.get_data_parallel_group())
            results = {k: v for part in gathered for k, v in part.items()}
        if rank == 0:
            _report(job, results)
    finally:
        teardown()


def decode_graph_note(cfg: GenerateConfig, model: List[torch.nn.Module]) -> Optional[str]:
    """A line when decode_cuda_graph=true cannot act on the loaded model: the captured step is
    the lean decode step, which only some models take (known once the model is built; the
    settings that rule it out are refused before, in `GenerateConfig` and `prepare_job`)."""
    from framework.fast import lean_decode
    from framework.models.wrappers import unwrap

    if cfg.decode_cuda_graph and not all(lean_decode.supported(unwrap(m)) for m in model):
        return ("generation: decode_cuda_graph=true is not used: this model's layers are not "
                "ones the lean decode step reproduces (framework/fast/lean_decode.py), so decode "
                "steps run through megatron-core's modules")
    return None


def _report(job: GenerateJob, results: Dict[int, Dict[str, Any]]) -> None:
    tokenizer = job.tokenizer.load()
    records = []
    for i, prompt in enumerate(job.prompts):
        rec = results[i]
        ids = [t for t in rec["tokens"] if t != job.eos_id]
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        out = {"prompt": prompt, "completion": completion, "tokens": rec["tokens"]}
        if "logprobs" in rec:
            out["logprobs"] = rec["logprobs"]
        records.append(out)
    if job.answers is None:
        for i, r in enumerate(records):
            print(f"[{i}] {r['prompt']!r} -> {r['completion']!r}", flush=True)
    else:
        correct = 0
        for i, (r, answer) in enumerate(zip(records, job.answers)):
            got = r["completion"].split("\n", 1)[0].strip()
            correct += got == answer
            r["answer"] = answer
            if i < 5:
                print(f"[{i}] {r['prompt']}{got}  (expected {answer})", flush=True)
        print(f"held-out arithmetic accuracy: {correct}/{len(records)} = "
              f"{100.0 * correct / len(records):.1f}%", flush=True)
    if job.cfg.output_file:
        write_jsonl(job.cfg.output_file, records)
        print(f"wrote {len(records)} results to {job.cfg.output_file}", flush=True)


def write_jsonl(path: str, records: List[Dict[str, Any]]) -> None:
    """Write `records` to `path` through a temporary file beside it, renamed over `path` once
    complete: a failed write leaves neither a partial file nor a damaged earlier one."""
    tmp = None
    shown, path = path, os.path.realpath(path)  # through a symlink: the link stays
    try:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; as open() would: the umask
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ConfigError(f"output_file={shown}: cannot write it ({e.strerror or e})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
