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


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    if _use_triton(key):
        return _triton_kernels().write_kv_cache(key, value, kv_cache, slot_mapping)
    return reference.write_kv_cache(key, value, kv_cache, slot_mapping)


def paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    if _use_triton(query):
        return _triton_kernels().paged_attention(query, kv_cache, query_start_loc, seq_lens,
                                                 block_tables, scale)
    return reference.paged_attention(query, kv_cache, query_start_loc, seq_lens, block_tables, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _triton_kernels().rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    if _use_triton(query):
        return _triton_kernels().rotary_embedding(positions, query, key, cos_sin_cache)
    return reference.rotary_embedding(positions, query, key, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return _triton_kernels().silu_and_mul(x)
    return reference.silu_and_mul(x)


def sample_gumbel(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    if _use_triton(logits):
        from kernels.triton_sampling import sample_gumbel as triton_sample_gumbel
        return triton_sample_gumbel(logits, temperature, seeds)
    return reference.sample_gumbel(logits, temperature, seeds)
