"""The Llama family (Llama 2/3, Mistral, SmolLM2), and the decoder the Qwen models reuse.

Module names mirror Hugging Face's (`model.layers.N.self_attn...`), except the fused
`qkv_proj` and `gate_up_proj`, so checkpoint names map one to one (see `MergedLinear.shards`).
The step's tokens of every request arrive flattened to `[num_tokens]`; attention metadata
tells the paged attention which rows belong to which sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels import ops
from workers.attention import Attention, AttentionMetadata
from workers.models.layers import Embedding, Linear, MergedLinear, RMSNorm
from workers.models.rotary import RotaryEmbedding, compute_inv_freq


@dataclass(frozen=True)
class LayerOptions:
    """What differs between the families sharing this decoder."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before the rotary embedding


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, options: LayerOptions, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size,
                                     {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size},
                                     options.qkv_bias, dtype)
        self.o_proj = Linear(q_size, config.hidden_size, options.o_bias, dtype)
        if options.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.qk_norm = options.qk_norm
        self.rotary_emb = rotary  # one module (and cos/sin cache) shared by every layer
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        qk_norm = (self.q_norm, self.k_norm) if self.qk_norm else None
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb, attn_metadata, qk_norm))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, options: LayerOptions, dtype: torch.dtype) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; supported: 'silu'")
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, {"gate_proj": size, "up_proj": size},
                                         options.mlp_bias, dtype)
        self.down_proj = Linear(size, config.hidden_size, options.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, options: LayerOptions, rotary: RotaryEmbedding,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, options, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, options, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: each norm returns (normed, sum).
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, options: LayerOptions, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.rotary_emb = RotaryEmbedding(config.max_position_embeddings,
                                          compute_inv_freq(config, head_dim_of(config)))
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, options, self.rotary_emb, dtype)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Interface shared by every model: `forward` to final hidden states, `compute_logits` on
    the rows the sampler needs, `attention_layers` for the runner to bind KV caches."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, self.layer_options(config), dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def layer_options(config: Any) -> LayerOptions:
        attention_bias = getattr(config, "attention_bias", False)
        return LayerOptions(qkv_bias=attention_bias, o_bias=attention_bias,
                            mlp_bias=getattr(config, "mlp_bias", False), qk_norm=False)

    @property
    def sliding_window(self) -> int | None:
        """Attention here is always full; beyond this many tokens a sliding-window model
        (Mistral v0.1) would differ from its reference, so the runner caps max_model_len."""
        return getattr(self.config, "sliding_window", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """float32=False leaves the logits in the model's dtype, for a consumer that reads
        them once (the fused sampler) rather than paying for a float32 copy."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's architecture (with an optional sliding window, see `sliding_window`)."""
