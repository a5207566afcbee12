"""Qwen2: the Llama decoder with biases on q, k and v (none on o_proj or the MLP)."""

from __future__ import annotations

from typing import Any

from workers.models.llama import LayerOptions, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layer_options(config: Any) -> LayerOptions:
        return LayerOptions(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False)

    @property
    def sliding_window(self) -> int | None:
        # Qwen configs carry a sliding_window value even when the window is switched off.
        if not getattr(self.config, "use_sliding_window", False):
            return None
        return self.config.sliding_window
