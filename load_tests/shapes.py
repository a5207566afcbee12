"""Model shapes people serve, as transformers configs: the benchmarks build random-weight
checkpoints from them (or, with `--load-format dummy`, only a config.json). Together the dense
ones span head_dim 64 and 128, GQA ratios 1 to 8, hidden 1024 to 8192, tied and untied
embeddings, and vocabularies of 32k to 152k; two mixtures of experts follow (128 small experts,
top-8; 8 large experts, top-2)."""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA3_1_ROPE = {**_LLAMA3_ROPE, "factor": 8.0}
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0)
_QWEN = dict(vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0)

# name -> (architecture, config keyword arguments)
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(_QWEN, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                            num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                                            tie_word_embeddings=True)),
    "llama-3.2-1b": ("LlamaForCausalLM", dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                              num_key_value_heads=8, head_dim=64, intermediate_size=8192,
                                              tie_word_embeddings=True, rope_scaling=_LLAMA3_ROPE)),
    "qwen2.5-1.5b": ("Qwen2ForCausalLM", dict(_QWEN, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                              num_key_value_heads=2, intermediate_size=8960,
                                              tie_word_embeddings=True)),
    "llama-2-7b": ("LlamaForCausalLM", dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                            hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                            num_key_value_heads=32, intermediate_size=11008,
                                            tie_word_embeddings=False)),
    "llama-3.1-8b": ("LlamaForCausalLM", dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                              num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                                              tie_word_embeddings=False, rope_scaling=_LLAMA3_1_ROPE)),
    "qwen3-32b": ("Qwen3ForCausalLM", dict(_QWEN, hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
                                           num_key_value_heads=8, head_dim=128, intermediate_size=25600,
                                           tie_word_embeddings=False)),
    "llama-3.1-70b": ("LlamaForCausalLM", dict(_LLAMA3, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                               num_key_value_heads=8, head_dim=128, intermediate_size=28672,
                                               tie_word_embeddings=False, rope_scaling=_LLAMA3_1_ROPE)),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", dict(_QWEN, hidden_size=2048, num_hidden_layers=48,
                                                  num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                                  intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                                                  num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
                                                  mlp_only_layers=[], tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralForCausalLM", dict(vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                                                rope_theta=1_000_000.0, hidden_size=4096, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                                num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                                                tie_word_embeddings=False)),
}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
               "Qwen3MoeForCausalLM": "qwen3_moe", "MixtralForCausalLM": "mixtral"}


def shape_config(name: str) -> Any:
    """The transformers config of a shape, in bf16."""
    from transformers import AutoConfig

    architecture, kwargs = SHAPES[name]
    return AutoConfig.for_model(MODEL_TYPES[architecture], architectures=[architecture], torch_dtype="bfloat16", **kwargs)
