"""Qwen3: the Llama decoder with RMSNorm over each head of q and k before the rotary
embedding, and q/k/v/o biases only if `attention_bias` (off in released models)."""

from __future__ import annotations

from typing import Any

from workers.models.llama import LayerOptions
from workers.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @staticmethod
    def layer_options(config: Any) -> LayerOptions:
        attention_bias = getattr(config, "attention_bias", False)
        return LayerOptions(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False,
                            qk_norm=True)
