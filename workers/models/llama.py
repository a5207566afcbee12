"""The Llama family (Llama 2/3, Mistral, SmolLM2), and the decoder the Qwen models reuse.

Module names mirror Hugging Face's (`model.layers.N.self_attn...`), except the fused
`qkv_proj` and `gate_up_proj`, so checkpoint names map one to one (see
`MergedColumnParallelLinear.shards`). The step's tokens of every request arrive flattened to
`[num_tokens]`; attention metadata tells the paged attention which rows belong to which sequence.

Tensor parallel (Megatron-style): each rank holds num_heads / N query heads and their KV heads
(or, with fewer KV heads than ranks, a copy of the one its query heads use), and 1/N of the
MLP; o_proj and down_proj all-reduce. Norms and the rotary cache are replicated.

Quantized (a `quant` LinearMethod): every linear layer of the decoder holds its weights in the
method's format; the embedding, the norms and the LM head stay in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from kernels import ops
from workers.attention import Attention, AttentionMetadata
from workers.distributed import SINGLE_RANK, TensorParallelGroup
from workers.quantization.base import LinearMethod
from workers.models.layers import (MergedColumnParallelLinear, ParallelLMHead, RMSNorm,
                                   RowParallelLinear, Shard, VocabParallelEmbedding, even_shard)
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


def num_kv_heads_of(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_tensor_parallel(config: Any, tp_size: int) -> None:
    """A ValueError naming the value `tp_size` cannot split, and the sizes that would work."""
    problem = _tensor_parallel_problem(config, tp_size)
    if problem:
        allowed = [n for n in range(1, config.num_attention_heads + 1)
                   if _tensor_parallel_problem(config, n) is None]
        raise ValueError(f"{problem}; tensor_parallel_size values this model allows: {allowed}")


def _tensor_parallel_problem(config: Any, n: int) -> str | None:
    heads, kv_heads = config.num_attention_heads, num_kv_heads_of(config)
    if heads % n:
        return f"tensor_parallel_size {n} must divide num_attention_heads {heads}"
    if kv_heads % n and n % kv_heads:
        return f"tensor_parallel_size {n} must divide num_key_value_heads {kv_heads} or be a multiple of it"
    for name in ("intermediate_size", "moe_intermediate_size"):  # the dense MLP's and each expert's
        size = getattr(config, name, None)
        if size is not None and size % n:
            return f"tensor_parallel_size {n} must divide {name} {size}"
    return None


def kv_shard(num_kv_heads: int, head_dim: int, tp: TensorParallelGroup) -> Shard:
    """This rank's rows of k_proj (or v_proj): its 1/N of the KV heads when there are at least N,
    else a copy of the one KV head its query heads use (rank r: head r * num_kv_heads // N)."""
    if num_kv_heads >= tp.world_size:
        return even_shard(num_kv_heads * head_dim, tp)
    head = tp.rank * num_kv_heads // tp.world_size
    return Shard(0, num_kv_heads * head_dim, head * head_dim, head_dim)


class LlamaAttention(nn.Module):
    """Attention over this rank's heads: `num_heads` and `num_kv_heads` are local counts."""

    def __init__(self, config: Any, options: LayerOptions, rotary: RotaryEmbedding,
                 dtype: torch.dtype, tp: TensorParallelGroup, quant: LinearMethod | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        q_shard = even_shard(config.num_attention_heads * self.head_dim, tp)
        k_shard = kv_shard(num_kv_heads_of(config), self.head_dim, tp)
        self.num_heads = q_shard.size // self.head_dim
        self.num_kv_heads = k_shard.size // self.head_dim
        self.qkv_proj = MergedColumnParallelLinear(
            config.hidden_size, {"q_proj": q_shard, "k_proj": k_shard, "v_proj": k_shard},
            options.qkv_bias, dtype, quant)
        self.o_proj = RowParallelLinear(q_shard.full, config.hidden_size, options.o_bias, dtype, tp, quant)
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
    def __init__(self, config: Any, options: LayerOptions, dtype: torch.dtype,
                 tp: TensorParallelGroup, quant: LinearMethod | None = None) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; supported: 'silu'")
        shard = even_shard(config.intermediate_size, tp)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, {"gate_proj": shard, "up_proj": shard}, options.mlp_bias, dtype, quant)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           options.mlp_bias, dtype, tp, quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, options: LayerOptions, rotary: RotaryEmbedding,
                 dtype: torch.dtype, tp: TensorParallelGroup, mlp: nn.Module,
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, options, rotary, dtype, tp, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: each norm returns (normed, sum).
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, options: LayerOptions, dtype: torch.dtype,
                 tp: TensorParallelGroup, make_mlp: Callable[[int], nn.Module],
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.rotary_emb = RotaryEmbedding(config.max_position_embeddings,
                                          compute_inv_freq(config, head_dim_of(config)))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, options, self.rotary_emb, dtype, tp, make_mlp(index), quant)
            for index in range(config.num_hidden_layers))
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
    the rows the sampler needs, `attention_layers` for the runner to bind KV caches.

    With a `tp` group of N ranks this is rank `tp.rank`'s shard: every rank runs `forward` on
    the same inputs, and `compute_logits` gives every rank the full vocabulary's logits."""

    def __init__(self, config: Any, dtype: torch.dtype, tp: TensorParallelGroup = SINGLE_RANK,
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        check_tensor_parallel(config, tp.world_size)
        self.config = config
        self.tp = tp
        options = self.layer_options(config)
        self.model = LlamaModel(config, options, dtype, tp,
                                lambda index: self.feed_forward(config, index, options, dtype, tp, quant), quant)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype, tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def layer_options(config: Any) -> LayerOptions:
        attention_bias = getattr(config, "attention_bias", False)
        return LayerOptions(qkv_bias=attention_bias, o_bias=attention_bias,
                            mlp_bias=getattr(config, "mlp_bias", False), qk_norm=False)

    @staticmethod
    def feed_forward(config: Any, layer_index: int, options: LayerOptions, dtype: torch.dtype,
                     tp: TensorParallelGroup, quant: LinearMethod | None) -> nn.Module:
        """Layer `layer_index`'s feed-forward block: the dense MLP here, a mixture of experts in
        the MoE models (workers/models/moe.py)."""
        return LlamaMLP(config, options, dtype, tp, quant)

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
