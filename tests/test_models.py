"""Octavo's model definitions against transformers on the same tiny random checkpoints.

Each checkpoint is a transformers model with every weight randomized (norm weights too, so
swapped or missing norms show), saved as safetensors and loaded with Octavo's loader. Our
logits must match transformers' over prefill, decode, chunked prefill and mixed batches.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig,
                          Qwen2Config, Qwen3Config)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from workers.attention import Attention
from workers.model_loader import load_model
from workers.models.rotary import compute_inv_freq

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS: dict[str, PretrainedConfig] = {
    "llama-tied": LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama3-rope-untied": LlamaConfig(**SMALL, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    "llama-bias-mha": LlamaConfig(**{**SMALL, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True),
    "mistral": MistralConfig(**SMALL, sliding_window=None, tie_word_embeddings=False),
    "qwen2-tied": Qwen2Config(**SMALL, tie_word_embeddings=True),
    # head_dim 32 != hidden_size / num_heads, as in real Qwen3 models.
    "qwen3": Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
}
BLOCK_SIZE = 4


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(checkpoint dir, the float32 transformers model saved there)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param], dtype=torch.float32)
    randomize(model, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model.eval()


def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel} x max |logit| {scale:.3g}"


def run_step(model, tokens: list[int], positions, metadata) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), positions, metadata)
        return model.compute_logits(hidden)


def test_prefill_then_decode_matches_transformers(checkpoint, paged_sequences):
    path, reference = checkpoint
    model = load_model(path, torch.float32, torch.device("cpu"))
    tokens = torch.randint(0, 320, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = hf_logits(reference, tokens)
    seqs = paged_sequences(model, num_seqs=1, max_blocks=4, block_size=BLOCK_SIZE, dtype=torch.float32)

    logits = run_step(model, tokens[:10], *seqs.step({0: 10}))
    assert logits.dtype == torch.float32 and logits.shape == (10, 320)
    assert_close(logits, expected[:10], rel=1e-5)
    for i in range(10, 13):
        logits = run_step(model, [tokens[i]], *seqs.step({0: 1}))
        assert_close(logits[0], expected[i], rel=1e-5)


def test_mixed_batch_of_prefill_chunks_and_decodes(checkpoint, paged_sequences):
    """Two sequences per step: a prefill split in two chunks beside another sequence's
    prefill, then its decodes, then both decoding; rows must not leak between sequences."""
    path, reference = checkpoint
    model = load_model(path, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, 320, (10,), generator=gen).tolist()
    b = torch.randint(0, 320, (8,), generator=gen).tolist()
    expected_a, expected_b = hf_logits(reference, a), hf_logits(reference, b)
    seqs = paged_sequences(model, num_seqs=2, max_blocks=3, block_size=BLOCK_SIZE, dtype=torch.float32)

    logits = run_step(model, a[:5] + b[:6], *seqs.step({0: 5, 1: 6}))
    assert_close(logits[:5], expected_a[:5], rel=1e-5)
    assert_close(logits[5:], expected_b[:6], rel=1e-5)
    logits = run_step(model, [b[6]] + a[5:9], *seqs.step({1: 1, 0: 4}))
    assert_close(logits[0], expected_b[6], rel=1e-5)
    assert_close(logits[1:], expected_a[5:9], rel=1e-5)
    logits = run_step(model, [a[9], b[7]], *seqs.step({0: 1, 1: 1}))
    assert_close(logits[0], expected_a[9], rel=1e-5)
    assert_close(logits[1], expected_b[7], rel=1e-5)


def test_bfloat16_as_close_as_transformers_bfloat16(checkpoint, paged_sequences):
    """In bfloat16 we need not match transformers bit for bit, but must be about as close to
    the float32 logits as transformers' own bfloat16 run is."""
    path, reference = checkpoint
    model = load_model(path, torch.bfloat16, torch.device("cpu"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    expected = hf_logits(reference, tokens)
    hf_bf16_error = (hf_logits(copy.deepcopy(reference).bfloat16(), tokens) - expected).abs().max().item()
    seqs = paged_sequences(model, num_seqs=1, max_blocks=3, block_size=BLOCK_SIZE, dtype=torch.bfloat16)
    prefill = run_step(model, tokens[:11], *seqs.step({0: 11}))
    decode = run_step(model, tokens[11:], *seqs.step({0: 1}))
    logits = torch.cat((prefill, decode))
    assert logits.dtype == torch.float32
    error = (logits - expected).abs().max().item()
    assert error <= 2 * hf_bf16_error, f"bfloat16 error {error:.3g} vs transformers' {hf_bf16_error:.3g}"


def test_attention_layers_in_order(checkpoint):
    path, reference = checkpoint
    model = load_model(path, torch.float32, torch.device("cpu"))
    layers = model.attention_layers()
    config = reference.config
    assert len(layers) == config.num_hidden_layers
    assert all(isinstance(layer, Attention) for layer in layers)
    assert layers[0] is model.model.layers[0].self_attn.attn
    assert layers[0].num_kv_heads == config.num_key_value_heads
    assert layers[0].head_dim == (getattr(config, "head_dim", None) or config.hidden_size // 4)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == config.tie_word_embeddings


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    LLAMA3_ROPE,
])
def test_inv_freq_matches_transformers(rope):
    config = LlamaConfig(**SMALL, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        hf_inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    else:
        hf_inv_freq, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
    torch.testing.assert_close(compute_inv_freq(config, 16), hf_inv_freq, rtol=0, atol=0)


def test_legacy_rope_scaling_config_is_read():
    """transformers 4 configs keep `rope_theta` apart and call the dict `rope_scaling` with `type`."""
    legacy = SimpleNamespace(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0},
                             max_position_embeddings=64)
    expected = 1.0 / (1000.0 ** (torch.arange(0, 16, 2).float() / 16)) / 2.0
    torch.testing.assert_close(compute_inv_freq(legacy, 16), expected)


def test_unsupported_rope_type_is_named():
    config = SimpleNamespace(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_theta=1e4)
    with pytest.raises(ValueError, match="'yarn'.*llama3"):
        compute_inv_freq(config, 16)
