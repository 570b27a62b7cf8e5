"""Model shapes for the speed benchmarks, and the settings each side runs them with.

One `Shape` names a decoder's dimensions once; from it come
* our side: the `train.py` overrides (`ours_overrides`), the same path users run;
* Hugging Face's side: the transformers model (`hf_model`: GPT2LMHeadModel, LlamaForCausalLM or
  Qwen2ForCausalLM);
* the parameter count and the FLOPs per token that MFU divides by (`Shape.params`,
  `Shape.flops_per_token`);
* the settings each side actually ran with, as one flat dict per side (`ours_settings` from our
  composed config, `hf_settings` from the built HF model and optimizer), which
  `compare_settings` checks field by field before any timing counts: same dimensions, dropout,
  optimizer, clipping, LR schedule, batch, precision (compute and master-weight dtypes, FP8) and
  data (the distribution the token ids are drawn from). What legitimately differs (how the
  precision is implemented, vocab padding, kernels, batch reuse) is listed in `NOT_COMPARED`,
  printed, and not compared.

Public dimensions: GPT-2 (OpenAI's release), Llama-3.2-1B / 3B and Qwen2.5-1.5B (their
published config.json). Qwen2.5-1.5B ties its embeddings (`tie_word_embeddings: true`, 1.54B
parameters of which 1.31B are not embeddings); `qwen2_5_1_5b_untied` is the same shape with an
untied output layer, for the untied fused-CE path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

PEAK_TFLOPS_BF16 = 989.0  # H100/H200 SXM dense bf16, the denominator of every MFU here


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # gpt2 | llama | qwen2 (which HF class runs it)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    tied: bool
    norm: str  # LayerNorm | RMSNorm
    norm_eps: float
    activation: str  # gelu_tanh (GPT-2's "gelu_new") | swiglu
    position: str  # learned_absolute | rope
    rope_theta: float
    linear_bias: bool  # biases on every linear layer (GPT-2)
    qkv_bias: bool  # a bias on the QKV projection (GPT-2, Qwen2)
    preset: str  # our conf/model preset the overrides start from

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def replace(self, **kw) -> "Shape":
        return dataclasses.replace(self, **kw)

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: the layers' projections and the output
        layer (counted whether or not it is tied to the embedding, whose lookup is no matmul)."""
        h, hd = self.hidden, self.head_dim
        q = self.heads * hd
        attn = h * q + 2 * h * self.kv_heads * hd + q * h
        mlp = (3 if self.gated else 2) * h * self.ffn
        return self.layers * (attn + mlp) + self.vocab * h

    def flops_per_token(self) -> float:
        """6 x matmul params + 12 x layers x hidden x seq (forward + backward, attention scores
        and values counted over the full square as Megatron and PaLM do). For GPT-2 shapes this
        is Megatron's 72 l h^2 (1 + s/6h + V/12lh)."""
        return 6.0 * self.matmul_params() + 12.0 * self.layers * self.hidden * self.seq

    def params(self, vocab: Optional[int] = None) -> int:
        """All parameters (embedding rows = `vocab`, default the real vocab)."""
        v = self.vocab if vocab is None else vocab
        h, hd = self.hidden, self.head_dim
        q, kv = self.heads * hd, self.kv_heads * hd
        norm = h * (2 if self.norm == "LayerNorm" else 1)
        n = v * h + (self.seq * h if self.position == "learned_absolute" else 0)
        layer = 2 * norm + h * q + 2 * h * kv + q * h
        layer += (3 if self.gated else 2) * h * self.ffn
        if self.linear_bias:
            layer += q + 2 * kv + h + (2 if self.gated else 1) * self.ffn + h
        elif self.qkv_bias:
            layer += q + 2 * kv
        n += self.layers * layer + norm
        if not self.tied:
            n += v * h
        return n


def _gpt2(name, layers, hidden, heads) -> Shape:
    return Shape(name=name, family="gpt2", layers=layers, hidden=hidden, heads=heads,
                 kv_heads=heads, ffn=4 * hidden, vocab=50257, seq=1024, tied=True,
                 norm="LayerNorm", norm_eps=1e-5, activation="gelu_tanh",
                 position="learned_absolute", rope_theta=0.0, linear_bias=True, qkv_bias=True,
                 preset=name)


def _llama(name, layers, hidden, heads, kv_heads, ffn, tied=True) -> Shape:
    return Shape(name=name, family="llama", layers=layers, hidden=hidden, heads=heads,
                 kv_heads=kv_heads, ffn=ffn, vocab=128256, seq=2048, tied=tied, norm="RMSNorm",
                 norm_eps=1e-5, activation="swiglu", position="rope", rope_theta=500000.0,
                 linear_bias=False, qkv_bias=False, preset="gpt2_large")


_QWEN = Shape(name="qwen2_5_1_5b", family="qwen2", layers=28, hidden=1536, heads=12, kv_heads=2,
              ffn=8960, vocab=151936, seq=2048, tied=True, norm="RMSNorm", norm_eps=1e-6,
              activation="swiglu", position="rope", rope_theta=1000000.0, linear_bias=False,
              qkv_bias=True, preset="gpt2_large")

SHAPES: Dict[str, Shape] = {s.name: s for s in [
    _gpt2("gpt2_small", 12, 768, 12),
    _gpt2("gpt2_medium", 24, 1024, 16),
    _gpt2("gpt2_large", 36, 1280, 20),
    _gpt2("gpt2_xl", 48, 1600, 25),
    _llama("llama3_1b", 16, 2048, 32, 8, 8192),  # Llama-3.2-1B
    _llama("llama3_3b", 28, 3072, 24, 8, 8192),  # Llama-3.2-3B
    _QWEN,  # Qwen2.5-1.5B
    _QWEN.replace(name="qwen2_5_1_5b_untied", tied=False),
]}

TITLES = {"gpt2_small": "gpt2 (124M)", "gpt2_medium": "gpt2-medium (355M)",
          "gpt2_large": "gpt2-large (774M)", "gpt2_xl": "gpt2-xl (1.5B)",
          "llama3_1b": "Llama-3.2-1B shape", "llama3_3b": "Llama-3.2-3B shape",
          "qwen2_5_1_5b": "Qwen2.5-1.5B shape",
          "qwen2_5_1_5b_untied": "Qwen2.5-1.5B shape, untied output layer"}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise KeyError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def check_dropout(shape: Shape, dropout: float) -> None:
    """HF's Llama and Qwen2 have attention dropout only (no residual or embedding dropout), so
    no non-zero dropout runs the same arithmetic on both sides there."""
    if dropout and shape.family != "gpt2":
        raise ValueError(f"dropout={dropout}: {shape.name} ({shape.family}) has no residual "
                         f"dropout in Hugging Face, so only dropout 0 is like for like")


# --------------------------------------------------------------------------------------------
# our side
# --------------------------------------------------------------------------------------------
def ours_overrides(shape: Shape, dropout: float) -> List[str]:
    """`train.py` overrides that build `shape` (every dimension spelled out, so the command is
    the whole description) with `dropout` on the residual/embedding and attention paths."""
    b = lambda x: "true" if x else "false"  # noqa: E731
    o = [f"model={shape.preset}", f"model.num_layers={shape.layers}",
         f"model.hidden_size={shape.hidden}", f"model.num_attention_heads={shape.heads}"]
    if shape.kv_heads != shape.heads:
        o.append(f"model.num_query_groups={shape.kv_heads}")
    o += [f"model.ffn_hidden_size={shape.ffn}", f"model.seq_length={shape.seq}",
          f"model.max_position_embeddings={shape.seq}", f"model.vocab_size={shape.vocab}",
          f"model.normalization={shape.norm}", f"model.layernorm_epsilon={shape.norm_eps:g}",
          f"model.activation={shape.activation}", f"model.add_bias_linear={b(shape.linear_bias)}",
          f"model.add_qkv_bias={b(shape.qkv_bias and not shape.linear_bias)}",
          f"model.position_embedding_type={shape.position}"]
    if shape.position == "rope":
        o.append(f"model.rotary_base={int(shape.rope_theta)}")
    o += [f"model.share_embeddings_and_output_weights={b(shape.tied)}",
          f"model.hidden_dropout={dropout:g}", f"model.attention_dropout={dropout:g}",
          # the benchmark's own lr (conf/optimizer/adam.yaml's is tuned for the default job);
          # hf_baseline.py's default is the same, and speed does not depend on it
          "optimizer.lr=1e-3"]
    return o


def compose_ours(overrides: List[str]):
    """Our typed config, composed from `overrides` exactly as train.py composes it (hydra.*
    overrides, which only place the run directory, are left out)."""
    import os

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from framework.cli import register_resolvers
    from framework.config import register_configs

    register_configs()
    register_resolvers()
    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        d = compose(config_name="train",
                    overrides=[o for o in overrides if not o.startswith("hydra.")])
    return OmegaConf.to_object(d)


def random_ids(vocab: Optional[int]) -> str:
    """The `data` field of a run on token ids drawn uniformly over [0, vocab) from a seeded
    generator (every side's benchmark data; None: the tokenizer's vocabulary)."""
    return f"uniform random ids over [0, {vocab if vocab else 'tokenizer vocab'}), seeded"


def ours_data(cfg) -> str:
    """The `data` field of our run: data=random draws ids uniformly over [0, model.vocab_size)
    (framework/data/gpt.py RandomTokens, seeded by train.seed); any other data type says what
    it is, so that it differs from the baselines' random ids."""
    t = cfg.data.type
    if t == "random":
        return random_ids(cfg.model.vocab_size)
    if t == "mock":
        return "megatron-core MockGPTDataset (a fixed cycle of ids)"
    return f"data.type={t}" + (f" {list(cfg.data.path)}" if cfg.data.path else "")


_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def short_dtype(dtype: Any) -> str:
    """'bf16' for torch.bfloat16 or 'bfloat16' (the settings' spelling of a dtype)."""
    name = str(dtype).replace("torch.", "")
    return _DTYPES.get(name, name)


def ours_precision(train) -> Dict[str, str]:
    """Our precision fields on a GPU, where the benchmarks run (train.bf16=null is bf16 there):
    the dtype the GEMMs read the weights in, the dtype of the master weights the optimizer
    updates (megatron-core keeps fp32 main params under bf16/fp16; fp32 training updates the
    fp32 params themselves), and the FP8 recipe of the layers' linears."""
    compute = "fp16" if train.fp16 else "fp32" if train.bf16 is False else "bf16"
    return {"compute_dtype": compute, "master_dtype": "fp32", "fp8": train.fp8 or "none"}


def optimizer_settings(opt) -> Dict[str, Any]:
    """The optimizer/schedule fields both sides must share, from our OptimizerConfig."""
    return {"optimizer": "AdamW" if opt.optimizer == "adam" else opt.optimizer,
            "lr": opt.lr, "min_lr": opt.min_lr, "betas": [opt.adam_beta1, opt.adam_beta2],
            "eps": opt.adam_eps, "weight_decay": opt.weight_decay,
            "no_weight_decay": "biases and 1-D (norm) parameters", "clip_grad": opt.clip_grad,
            "lr_warmup_steps": opt.lr_warmup_steps, "lr_decay_style": opt.lr_decay_style,
            "fused": bool(opt.fused_step)}


def global_batch(cfg) -> int:
    """train.global_batch_size as the run resolves it: null = micro-batch x DP (one GPU here
    unless parallel.data_parallel_size says otherwise)."""
    t = cfg.train
    dp = cfg.parallel.data_parallel_size or 1
    return t.global_batch_size if t.global_batch_size is not None else t.micro_batch_size * dp


def ours_settings(cfg) -> Dict[str, Any]:
    """The comparable settings of one composed run config (framework.config.Config)."""
    m = cfg.model
    linear_bias = bool(m.add_bias_linear)
    s = {
        "layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_attention_heads,
        "kv_heads": m.num_query_groups or m.num_attention_heads,
        "ffn": m.ffn_hidden_size or 4 * m.hidden_size, "vocab": m.vocab_size,
        "seq": m.seq_length, "tied": bool(m.share_embeddings_and_output_weights),
        "norm": m.normalization, "norm_eps": float(m.layernorm_epsilon),
        "activation": m.activation, "position": m.position_embedding_type,
        "rope_theta": float(m.rotary_base) if m.position_embedding_type == "rope" else 0.0,
        "linear_bias": linear_bias, "qkv_bias": linear_bias or bool(m.add_qkv_bias),
        "hidden_dropout": float(m.hidden_dropout), "attention_dropout": float(m.attention_dropout),
        "micro_batch": cfg.train.micro_batch_size, "global_batch": global_batch(cfg),
        "max_steps": cfg.train.max_steps, "data": ours_data(cfg),
        "recompute": cfg.parallel.recompute_granularity or "none",
        # framework/optimizer.py: null decays over train.max_steps
        "lr_decay_steps": cfg.optimizer.lr_decay_steps or decay_steps(cfg.train.max_steps),
    }
    s.update(optimizer_settings(cfg.optimizer))
    s.update(ours_precision(cfg.train))
    return s


# --------------------------------------------------------------------------------------------
# Hugging Face's side
# --------------------------------------------------------------------------------------------
def hf_config(shape: Shape, dropout: float, vocab: Optional[int] = None):
    """The transformers config of `shape` (SDPA attention, no KV cache in training)."""
    v = shape.vocab if vocab is None else vocab
    if shape.family == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_layer=shape.layers, n_embd=shape.hidden, n_head=shape.heads,
                          n_inner=shape.ffn, n_positions=shape.seq, vocab_size=v,
                          resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                          layer_norm_epsilon=shape.norm_eps, activation_function="gelu_new",
                          tie_word_embeddings=shape.tied, use_cache=False,
                          attn_implementation="sdpa")
    if shape.family == "llama":
        from transformers import LlamaConfig as C

        extra = {"attention_bias": shape.qkv_bias, "mlp_bias": False}
    elif shape.family == "qwen2":
        from transformers import Qwen2Config as C

        extra = {"use_sliding_window": False}  # Qwen2 always has the QKV bias
    else:
        raise ValueError(f"unknown family {shape.family!r}")
    return C(hidden_size=shape.hidden, intermediate_size=shape.ffn,
             num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
             num_key_value_heads=shape.kv_heads, vocab_size=v, max_position_embeddings=shape.seq,
             rms_norm_eps=shape.norm_eps, rope_theta=shape.rope_theta,
             tie_word_embeddings=shape.tied, attention_dropout=dropout, hidden_act="silu",
             use_cache=False, attn_implementation="sdpa", **extra)


def hf_model(shape: Shape, dropout: float, vocab: Optional[int] = None):
    """The HF model for `shape`, built on the current default device (use `torch.device('meta')`
    to inspect a large one without memory)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(shape, dropout, vocab))
    if getattr(model, "loss_type", None) is None:
        # GPT2LMHeadModel's class name does not name its loss, so transformers logs "loss_type=None
        # ... using the default ForCausalLMLoss" from inside forward on the first call, and that
        # log call splits torch.compile's graph at the loss. Naming the loss it falls back to
        # gives the same loss without the break, so the baseline is compiled as one graph.
        model.loss_type = "ForCausalLM"
    return model


def _hf_decay_split(model):
    """(decay, no_decay) parameter lists under mcore's rule: no weight decay on biases and on
    1-D parameters (norm weights); everything else (matrices, embeddings) decays."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # a tied weight is one parameter
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or name.endswith(".bias") else decay).append(p)
    return decay, no_decay


def hf_optimizer(model, opt: Dict[str, Any], max_steps: int):
    """torch AdamW (fused when opt['fused']) with mcore's weight-decay groups, and a LambdaLR
    that follows megatron-core's OptimizerParamScheduler as our side builds it: linear warmup
    from 0 over lr_warmup_steps, then `lr_decay_style` down to min_lr at max_steps."""
    import torch

    decay, no_decay = _hf_decay_split(model)
    groups = [{"params": decay, "weight_decay": opt["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    o = torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                          fused=opt["fused"], foreach=False if opt["fused"] else None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        o, lambda step: lr_at(step, opt, max_steps) / opt["lr"])
    return o, sched


def decay_steps(max_steps: int) -> int:
    """The LR decay length of a run of `max_steps` steps without optimizer.lr_decay_steps (ours:
    framework/optimizer.py; HF: `lr_at`)."""
    return max(max_steps, 1)


def lr_at(step: int, opt: Dict[str, Any], max_steps: int) -> float:
    """megatron-core's OptimizerParamScheduler lr after `step` steps (init_lr 0), with the
    warmup clamp framework/optimizer.py applies."""
    import math

    max_lr, min_lr = opt["lr"], opt["min_lr"]
    n_decay = decay_steps(max_steps)
    warmup = min(opt["lr_warmup_steps"], max(n_decay - 1, 0))
    if warmup > 0 and step <= warmup:
        return max_lr * step / warmup
    if opt["lr_decay_style"] == "constant":
        return max_lr
    if step > n_decay:
        return min_lr
    ratio = (step - warmup) / (n_decay - warmup)
    coeff = 1.0 - ratio if opt["lr_decay_style"] == "linear" else 0.5 * (
        math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


def hf_settings(model, optimizer, opt: Dict[str, Any], seq: int, micro_batch: int,
                max_steps: int, *, data: str, autocast: str) -> Dict[str, Any]:
    """The comparable settings of a built HF model and its built optimizer, read from those
    objects (`opt` supplies only what the training loop applies: clipping and the schedule;
    `data` what its batches draw (hf_baseline.data_setting), `autocast` the dtype its forward
    runs under)."""
    c = model.config
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    if c.model_type == "gpt2":
        blk = model.transformer.h[0]
        dims = dict(layers=c.n_layer, hidden=c.n_embd, heads=c.n_head, kv_heads=c.n_head,
                    ffn=c.n_inner or 4 * c.n_embd, norm="LayerNorm",
                    norm_eps=float(c.layer_norm_epsilon),
                    activation={"gelu_new": "gelu_tanh"}.get(c.activation_function,
                                                             c.activation_function),
                    position="learned_absolute", rope_theta=0.0,
                    linear_bias=blk.mlp.c_fc.bias is not None,
                    qkv_bias=blk.attn.c_attn.bias is not None,
                    hidden_dropout=float(c.resid_pdrop), attention_dropout=float(c.attn_pdrop))
        if c.embd_pdrop != c.resid_pdrop:
            dims["hidden_dropout"] = f"resid {c.resid_pdrop} != embd {c.embd_pdrop}"
    else:
        blk = model.model.layers[0]
        rope = getattr(c, "rope_parameters", None) or {"rope_theta": getattr(c, "rope_theta")}
        gated = hasattr(blk.mlp, "gate_proj") and c.hidden_act == "silu"
        dims = dict(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                    kv_heads=c.num_key_value_heads, ffn=c.intermediate_size, norm="RMSNorm",
                    norm_eps=float(c.rms_norm_eps),
                    activation="swiglu" if gated else c.hidden_act, position="rope",
                    rope_theta=float(rope["rope_theta"]),
                    linear_bias=blk.mlp.down_proj.bias is not None
                    and blk.self_attn.o_proj.bias is not None,
                    qkv_bias=blk.self_attn.q_proj.bias is not None,
                    hidden_dropout=0.0, attention_dropout=float(c.attention_dropout))
    d = optimizer.defaults
    groups = optimizer.param_groups
    decays = sorted({g["weight_decay"] for g in groups})
    _, want_no_decay = _hf_decay_split(model)
    no_decay = [p for g in groups if g["weight_decay"] == 0.0 for p in g["params"]]
    rule = ("biases and 1-D (norm) parameters"
            if {id(p) for p in no_decay} == {id(p) for p in want_no_decay} else
            f"{len(no_decay)} tensors")
    return dict(
        dims, vocab=c.vocab_size, seq=seq, tied=tied, micro_batch=micro_batch,
        global_batch=micro_batch, max_steps=max_steps, data=data, recompute="none",
        # fp32 params (the optimizer updates them) read in the autocast dtype by the GEMMs
        compute_dtype=short_dtype(autocast), master_dtype=short_dtype(emb.dtype), fp8="none",
        lr_decay_steps=decay_steps(max_steps),
        optimizer=type(optimizer).__name__ if d.get("decoupled_weight_decay", True) else "Adam",
        lr=float(groups[0].get("initial_lr", d["lr"])), min_lr=opt["min_lr"],
        betas=list(d["betas"]), eps=d["eps"], weight_decay=decays[-1], no_weight_decay=rule,
        clip_grad=opt["clip_grad"], lr_warmup_steps=opt["lr_warmup_steps"],
        lr_decay_style=opt["lr_decay_style"], fused=bool(d.get("fused")))


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------
# Settings that may differ, with why (printed in the table header; not compared).
NOT_COMPARED = ("vocab padding: ours pads the embedding/output rows to a multiple of 128 "
                "(megatron-core's make_vocab_size_divisible_by), HF keeps the real vocab",
                "how the precision is applied (compute and master-weight dtypes and FP8 are "
                "compared): ours keeps bf16 copies of the weights for compute (megatron-core "
                "Float16Module) and fp32 main params and fp32 grads in the optimizer; HF keeps "
                "fp32 params and grads and casts under torch.autocast(bf16)",
                "kernels: each side's own attention, norm and cross-entropy kernels",
                "batch reuse (the id distribution is compared): ours draws every sample afresh "
                "from (seed, index); HF cycles 4 fixed batches drawn from one seeded generator "
                "(no host RNG per step)")


def compare_settings(ours: Dict[str, Any], hf: Dict[str, Any], them: str = "HF") -> List[str]:
    """Fields whose values differ between the two sides ('' list when like for like); `them`
    names the other side in the messages."""
    diffs = []
    for k in sorted(set(ours) | set(hf)):
        a, b = ours.get(k, "<missing>"), hf.get(k, "<missing>")
        if isinstance(a, float) or isinstance(b, float):
            same = isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
                abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
        else:
            same = a == b
        if not same:
            diffs.append(f"{k}: ours {a!r} vs {them} {b!r}")
    return diffs


def settings_line(s: Dict[str, Any]) -> str:
    """The shared settings, one line, for the table header."""
    return (f"seq {s['seq']}, dropout {s['hidden_dropout']:g} (residual/embedding) and "
            f"{s['attention_dropout']:g} (attention), {s['optimizer']} fused={s['fused']} "
            f"lr {s['lr']:g} (warmup {s['lr_warmup_steps']}, {s['lr_decay_style']} to "
            f"{s['min_lr']:g} over {s['lr_decay_steps']} steps) betas {tuple(s['betas'])} eps "
            f"{s['eps']:g} weight decay {s['weight_decay']:g} (none on {s['no_weight_decay']}), "
            f"grad clip {s['clip_grad']:g}, global batch = micro-batch (no accumulation), "
            f"recompute {s['recompute']}, {s['compute_dtype']} compute with "
            f"{s['master_dtype']} master weights, FP8 {s['fp8']}, data: {s['data']}")
