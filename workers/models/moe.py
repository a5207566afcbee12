"""Mixture-of-experts models of the Llama family: Mixtral and Qwen3-MoE. Attention, norms and
embeddings are their dense siblings' (Mistral's, Qwen3's); the feed-forward of each sparse
layer is a router (`gate`) and a `FusedMoE` of experts.

- Mixtral: every layer sparse; softmax over the top-k router logits. Its checkpoints name the
  block `block_sparse_moe` and the experts' projections w1 (gate), w3 (up), w2 (down); those
  names are mapped onto Qwen3-MoE's, which the modules here carry.
- Qwen3-MoE: top-k of the softmax over all experts, renormalized if `norm_topk_prob`; layers in
  `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense MLP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workers.distributed import TensorParallelGroup
from workers.models.fused_moe import FusedMoE
from workers.models.layers import Linear
from workers.models.llama import LayerOptions, MistralForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM
from workers.quantization.base import LinearMethod


def check_unquantized_experts(quant: LinearMethod | None) -> None:
    if quant is not None:
        raise ValueError("quantized mixture-of-experts layers are not supported yet: serve this model "
                         "without --quantization (and from an unquantized checkpoint)")


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 renormalize: bool, hidden_act: str, dtype: torch.dtype, tp: TensorParallelGroup) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; supported: 'silu'")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {top_k} must be in [1, {num_experts}] (the experts)")
        self.gate = Linear(hidden_size, num_experts, bias=False, dtype=dtype)
        self.experts = FusedMoE(num_experts, top_k, hidden_size, intermediate_size, renormalize, dtype, tp)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden))


class MixtralForCausalLM(MistralForCausalLM):
    CHECKPOINT_RENAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."),
                          (".w3.", ".up_proj."), (".w2.", ".down_proj."))

    @staticmethod
    def feed_forward(config: Any, layer_index: int, options: LayerOptions, dtype: torch.dtype,
                     tp: TensorParallelGroup, quant: LinearMethod | None) -> nn.Module:
        check_unquantized_experts(quant)
        return SparseMoeBlock(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.intermediate_size, True, config.hidden_act, dtype, tp)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    @staticmethod
    def feed_forward(config: Any, layer_index: int, options: LayerOptions, dtype: torch.dtype,
                     tp: TensorParallelGroup, quant: LinearMethod | None) -> nn.Module:
        sparse = (layer_index not in config.mlp_only_layers and config.num_experts > 0
                  and (layer_index + 1) % config.decoder_sparse_step == 0)
        if not sparse:
            return Qwen3ForCausalLM.feed_forward(config, layer_index, options, dtype, tp, quant)
        check_unquantized_experts(quant)
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, config.norm_topk_prob, config.hidden_act,
                              dtype, tp)
