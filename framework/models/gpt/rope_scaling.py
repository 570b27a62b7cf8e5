"""Llama-3 RoPE frequency scaling with all four of Hugging Face's parameters.

megatron-core's `RotaryEmbedding(rope_scaling=True, rope_scaling_factor=f)` applies the Llama 3.1
scaling with `low_freq_factor=1`, `high_freq_factor=4` and `original_max_position_embeddings=8192`
fixed in the signature of `_apply_scaling`; HF's `rope_type: llama3` reads all three from the
config (Llama 3.2 uses factor 32, others may differ). So our GPT builder leaves mcore's scaling
off and replaces the embedding's `inv_freq` with the frequencies computed here.

The rule (Llama 3.1 paper / reference code): with wavelength w = 2*pi / inv_freq and context
C = original_max_position_embeddings,
* w < C / high_freq_factor (high frequencies): unchanged;
* w > C / low_freq_factor (low frequencies): divided by `factor`;
* in between: a linear blend of the two, with weight s = (C / w - low) / (high - low) on the
  unchanged frequency.
The base frequencies are 1 / base^(2i / dim) over the rotary dims, in fp32, as mcore and HF
compute them.
"""
from __future__ import annotations

import math

import torch


def base_inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
    return 1.0 / (float(base) ** (exponents / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, *, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    """Scaled inverse frequencies (same shape, dtype and device as `inv_freq`)."""
    context = float(original_max_position_embeddings)
    long_wave = context / low_freq_factor    # longer than this: scaled by 1/factor
    short_wave = context / high_freq_factor  # shorter than this: kept
    wave = (2 * math.pi) / inv_freq
    scaled = torch.where(wave > long_wave, inv_freq / factor, inv_freq)
    weight = (context / wave - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - weight) * scaled / factor + weight * scaled
    middle = (wave >= short_wave) & (wave <= long_wave)
    return torch.where(middle, blended, scaled)


def apply_rope_scaling(gpt: torch.nn.Module, model_cfg) -> None:
    """Replace the GPTModel's rotary frequencies with the llama3-scaled ones (model.rope_scaling)."""
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None or not model_cfg.rope_scaling:
        return
    old = rope.inv_freq
    dim = 2 * old.shape[0]
    new = llama3_inv_freq(
        base_inv_freq(dim, model_cfg.rotary_base, device=old.device),
        factor=model_cfg.rope_scaling_factor,
        low_freq_factor=model_cfg.rope_scaling_low_freq_factor,
        high_freq_factor=model_cfg.rope_scaling_high_freq_factor,
        original_max_position_embeddings=model_cfg.rope_scaling_original_max_position_embeddings)
    rope.inv_freq = new.to(old.dtype)
