"""Model definitions, and the registry from a checkpoint's `architectures` entry to the class.

Every class is built as `cls(hf_config, dtype, tp_group=SINGLE_RANK)` (a
`workers.distributed.TensorParallelGroup`; the instance is that rank's shard) and exposes
`forward(input_ids, positions, attn_metadata) -> hidden`, `compute_logits(hidden) -> float32
logits` (the full vocabulary on every rank) and `attention_layers() -> list[Attention]` (with
this rank's head counts). Adding a model is adding a file and a line here. A class may set
`CHECKPOINT_RENAMES`, (checkpoint substring, module-name substring) pairs the loader applies
to checkpoint names (Mixtral's).
"""

from __future__ import annotations

from types import MappingProxyType

from torch import nn

from workers.models.llama import LlamaForCausalLM, MistralForCausalLM
from workers.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from workers.models.qwen2 import Qwen2ForCausalLM
from workers.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: MappingProxyType[str, type[nn.Module]] = MappingProxyType({
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
})

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
           "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]
