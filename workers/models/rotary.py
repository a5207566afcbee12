"""Rotary position embedding: inverse frequencies from a Hugging Face config, and the
cos/sin cache the rotary kernel reads.

The frequencies follow transformers' `modeling_rope_utils` exactly (default, linear, llama3),
so positions rotate identically to the reference implementation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's RoPE parameters as one flat dict with `rope_type` and `rope_theta`.

    transformers 5 keeps them in `config.rope_parameters`; older configs have `rope_theta` and
    an optional `rope_scaling` dict whose type key may be spelled `type`.
    """
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return params


def compute_inv_freq(config: Any, head_dim: int) -> torch.Tensor:
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {params['partial_rotary_factor']} is not supported; "
                         "only 1.0 (the whole head rotates)")
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params, config)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any], config: Any) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed down by `factor`, short ones kept, a smooth blend between."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params.get("original_max_position_embeddings", config.max_position_embeddings)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """The cos/sin cache `[max_position, head_dim]` = cat(cos, sin) that rotates queries and keys
    (neox style) by their positions, in the attention layer's fused kernel.

    It stays float32 whatever the model dtype: transformers computes cos/sin in float32 too, and
    it is tiny. It is a non-persistent buffer, so `model.to(device)` moves it and checkpoints
    never carry it.
    """

    def __init__(self, max_position: int, inv_freq: torch.Tensor) -> None:
        super().__init__()
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1),
                             persistent=False)
