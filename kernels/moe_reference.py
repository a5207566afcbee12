"""The mixture-of-experts feed-forward in plain torch: the reference for `kernels.triton_moe`
and the CPU path. It loops over the experts that received tokens (a data-dependent host loop,
which is fine on the CPU and is exactly what the Triton path avoids)."""

from __future__ import annotations

import torch

from kernels.reference import silu_and_mul


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """hidden [T, H]; w13 [E, 2 * I, H]: each expert's gate rows then its up rows; w2 [E, H, I];
    topk_weights [T, k] (float32) and topk_ids [T, k] (integers in [0, E)): each token's experts
    and their router weights. Returns [T, H] in hidden's dtype:
    out[t] = sum_j topk_weights[t, j] * w2[e] @ silu_and_mul(w13[e] @ hidden[t]), e = topk_ids[t, j],
    summed in float32 expert by expert in ascending order (as transformers does)."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in topk_ids.unique().tolist():
        tokens, slots = (topk_ids == expert).nonzero(as_tuple=True)
        down = silu_and_mul(hidden[tokens] @ w13[expert].T) @ w2[expert].T
        out.index_add_(0, tokens, down.float() * topk_weights[tokens, slots, None].float())
    return out.to(hidden.dtype)
