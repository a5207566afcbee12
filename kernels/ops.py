"""The one dispatch point between Triton kernels and their torch references.

Models call only these functions. On a CUDA tensor with Triton available the Triton kernel
runs; everywhere else (the CPU) the torch reference does, with the same semantics.
"""

from __future__ import annotations

import torch

from kernels import reference


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and _triton_kernels() is not None


def _triton_kernels():
    try:
        from kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                    decode_order: torch.Tensor | None = None) -> torch.Tensor:
    args = (query, kv_cache, query_start_loc, seq_lens, block_tables, scale, decode_order)
    if _use_triton(query):
        return _triton_kernels().paged_attention(*args)
    return reference.paged_attention(*args)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _triton_kernels().rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def norm_rope_write_kv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       positions: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                       k_norm_weight: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    args = (query, key, value, positions, cos_sin_cache, kv_cache, slot_mapping, q_norm_weight,
            k_norm_weight, eps)
    if _use_triton(query):
        return _triton_kernels().norm_rope_write_kv(*args)
    return reference.norm_rope_write_kv(*args)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return _triton_kernels().silu_and_mul(x)
    return reference.silu_and_mul(x)


def sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    if _use_triton(logits):
        from kernels.triton_sampling import sample_gumbel as triton_sample_gumbel
        return triton_sample_gumbel(logits, temperature, seeds)
    return reference.sample_gumbel(logits, temperature, seeds)
