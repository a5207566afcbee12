"""The mixture-of-experts feed-forward layer: top-k routing, then every expert's gated MLP over
the tokens routed to it, in one fused call (`kernels.ops.fused_moe`).

The experts' weights are stacked, [num_experts, ...], as the fused kernel reads them: gate and
up rows of each expert in `gate_up_proj`, its down projection in `down_proj`. Checkpoints
store one tensor per expert (`...experts.N.gate_proj.weight`, as on the hub and as transformers'
`save_pretrained` writes them); the loader places each into its expert's slot.

Tensor parallel: each rank holds every expert's 1/N of the intermediate dimension (gate and up
rows column-split, down columns row-split), so a token's experts all run on every rank and one
all-reduce after the layer sums the partial outputs. The router is replicated.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernels import ops
from workers.distributed import SINGLE_RANK, TensorParallelGroup
from workers.models.layers import Shard, ShardMap, even_shard


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's `top_k` experts by softmax probability, and their weights (float32): the
    probabilities themselves, or renormalized to sum to 1 over the chosen experts (equal to a
    softmax over the top-k logits, as Mixtral routes)."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class StackedExpertWeight(nn.Module):
    """One weight per expert, stacked into `weight` [num_experts, rows, cols]. `parts` maps the
    checkpoint name of each expert's tensor (e.g. "gate_proj") to the rows or columns of it this
    rank holds; expert n's tensors are `<parent>.n.<name>.weight`."""

    def __init__(self, num_experts: int, rows: int, cols: int, parts: dict[str, Shard],
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, rows, cols, dtype=dtype), requires_grad=False)
        self.shards = {f"{expert}.{name}": dataclasses.replace(shard, stack_index=expert)
                       for expert in range(num_experts) for name, shard in parts.items()}

    def checkpoint_shards(self, param_name: str) -> ShardMap:
        return dict(self.shards)


class FusedMoE(nn.Module):
    """The experts of one layer, with their routing; `forward(hidden, router_logits)`."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 renormalize: bool, dtype: torch.dtype, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.tp = tp
        rows = even_shard(intermediate_size, tp)
        self.gate_up_proj = StackedExpertWeight(
            num_experts, 2 * rows.size, hidden_size,
            {"gate_proj": rows, "up_proj": dataclasses.replace(rows, offset=rows.size)}, dtype)
        self.down_proj = StackedExpertWeight(num_experts, hidden_size, rows.size,
                                             {"down_proj": even_shard(intermediate_size, tp, dim=1)}, dtype)

    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        out = ops.fused_moe(hidden, self.gate_up_proj.weight, self.down_proj.weight, weights, ids)
        return self.tp.all_reduce(out)
