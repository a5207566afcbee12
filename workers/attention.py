"""The paged attention layer and the per-step metadata it reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from kernels import ops

if TYPE_CHECKING:  # the models import this module
    from workers.models.layers import RMSNorm
    from workers.models.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer.

    Request i owns query rows `query_start_loc[i]:query_start_loc[i + 1]`; after this step its
    sequence holds `seq_lens[i]` tokens whose KV live in blocks `block_tables[i]`. Token t's
    new key and value go to slot `slot_mapping[t]` (= block_id * block_size + offset).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    # Decode batches (one query per request) may give the requests longest first: attention
    # starts their programs in that order, so the short ones even out the end of each launch
    # (2-4% less attention time at 64 to 256 requests of the reference workload, H100).
    decode_order: torch.Tensor | None = None  # [num_reqs] int64


class Attention(nn.Module):
    """Puts the step's keys/values into this layer's KV cache, then attends over the cache.

    Before the cache write, q and k are rotated and, with `qk_norm` (Qwen3), normalized per
    head: one fused kernel does all of it. The KV cache tensor is bound by the model runner after
    it sizes the cache (`[2, num_blocks, block_size, num_kv_heads, head_dim]`). An FP8 cache
    holds key / k_scale and value / v_scale: per-tensor scales from the checkpoint (its
    `k_scale` / `v_scale` tensors, set by the loader), 1.0 where it has none.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.kv_cache = torch.empty(0)
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                rotary: RotaryEmbedding, attn_metadata: AttentionMetadata,
                qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norm_args = (qk_norm[0].weight, qk_norm[1].weight, qk_norm[0].eps) if qk_norm else ()
        q = ops.norm_rope_write_kv(q, k, v, positions, rotary.cos_sin_cache, self.kv_cache,
                                   attn_metadata.slot_mapping, *norm_args, k_scale=self.k_scale,
                                   v_scale=self.v_scale)
        out = ops.paged_attention(q, self.kv_cache, attn_metadata.query_start_loc,
                                  attn_metadata.seq_lens, attn_metadata.block_tables, self.scale,
                                  attn_metadata.decode_order, self.k_scale, self.v_scale)
        return out.view(-1, self.num_heads * self.head_dim)


def bind_kv_caches(model: nn.Module, kv_caches: list[torch.Tensor]) -> None:
    """Give each attention layer of the model its KV cache tensor, in layer order."""
    for layer, kv_cache in zip(model.attention_layers(), kv_caches, strict=True):
        layer.kv_cache = kv_cache
