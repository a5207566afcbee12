"""Torch reference implementations of every kernel.

They define what each kernel computes, run on the CPU, and are what the Triton kernels are
tested against. Shapes:

- KV cache of one layer: `[2, num_blocks, block_size, num_kv_heads, head_dim]` (0 = key, 1 = value).
- A step's tokens are flattened: `[num_tokens, ...]`, request i owning rows
  `query_start_loc[i]:query_start_loc[i + 1]`, which are the last tokens of its sequence of
  `seq_lens[i]` tokens (the earlier ones are already in the cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the step's keys and values ([num_tokens, num_kv_heads, head_dim]) at their slots
    (`block_id * block_size + offset`); a slot of -1 (padding) is skipped."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each request's new queries over its whole cached sequence.

    query: [num_tokens, num_heads, head_dim]; returns the same shape. Grouped-query attention
    when num_heads is a multiple of num_kv_heads. The new tokens' keys and values must already
    be in the cache (write_kv_cache runs first).
    """
    block_size = kv_cache.shape[2]
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    # One SDPA call per request: the reference favours clarity; the Triton kernel does the
    # whole batch in one launch.
    for i, seq_len in enumerate(lens):
        q_start, q_end = starts[i], starts[i + 1]
        num_queries = q_end - q_start
        if num_queries == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[i, :num_blocks].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
        q = query[q_start:q_end].transpose(0, 1)  # [heads, queries, dim]
        k = k.transpose(0, 1).to(q.dtype)
        v = v.transpose(0, 1).to(q.dtype)
        # Query j sits at position seq_len - num_queries + j and sees keys up to that position.
        q_pos = torch.arange(seq_len - num_queries, seq_len).unsqueeze(1)
        mask = torch.arange(seq_len).unsqueeze(0) <= q_pos
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
                                           attn_mask=mask, scale=scale,
                                           enable_gqa=num_heads != num_kv_heads)
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual). With a residual, `x + residual` is normalized and is
    the new residual; without one, x itself is the new residual. Computed in float32."""
    if residual is not None:
        x = x + residual
    residual = x
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), residual


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hk, D] in place, neox style (halves rotated).
    cos_sin_cache: [max_position, D] holding cos in the first half and sin in the second."""
    cos_sin = cos_sin_cache[positions]
    half = cos_sin.shape[-1] // 2
    cos = cos_sin[:, :half].unsqueeze(1)
    sin = cos_sin[:, half:].unsqueeze(1)
    for x in (query, key):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated.to(x.dtype))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2 * d] holding gate then up; returns silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
