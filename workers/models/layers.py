"""Building blocks shared by the model families: linear layers (plain and fused), embedding,
RMSNorm. Parameters are created uninitialized (`torch.empty`): every value comes from the
checkpoint, and skipping random init makes construction instant even for large models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b, with W of shape [out_features, in_features] as in torch and checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several linear layers over the same input, fused into one matmul (qkv_proj, gate_up_proj).

    `shards` maps each checkpoint layer's name (e.g. "q_proj") to its rows of the fused weight;
    the loader reads it to place `...self_attn.q_proj.weight` into `...self_attn.qkv_proj.weight`.
    """

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__(in_features, sum(out_sizes.values()), bias, dtype)
        self.shards: dict[str, slice] = {}
        start = 0
        for name, size in out_sizes.items():
            self.shards[name] = slice(start, start + size)
            start += size

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split([s.stop - s.start for s in self.shards.values()], dim=-1)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param(num_embeddings, embedding_dim, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; with `residual`, normalizes `x + residual` and returns the sum
    as the new residual (the fused add-norm between decoder sublayers)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual)
