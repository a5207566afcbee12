"""Quantized models on the CPU (every path through its torch reference):

- AWQ and GPTQ unpacking against packers written from the formats' documented bit layouts
  (load_tests/quant_checkpoints.py), and whole 4-bit checkpoints against transformers running
  the weights they stand for;
- accuracy of every format against the unquantized model (load_tests/quant_accuracy.py):
  mean KL of next-token distributions and top-1 agreement, FP8 KV cache included;
- --load-format dummy with each method, and the unsupported settings refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from load_tests.quant_accuracy import compare, evaluate, prompt_logits
from load_tests.quant_checkpoints import pack_awq, pack_gptq_cols, pack_gptq_rows, write_quantized
from workers.model_loader import load_model
from workers.models.layers import Linear, MergedColumnParallelLinear, RowParallelLinear, Shard
from workers.quantization.awq import AWQMethod
from workers.quantization.config import linear_method
from workers.quantization.gptq import GPTQMethod
from workers.quantization.int4 import pack_int4_rows
from workers.distributed import TensorParallelGroup
from kernels import reference

CPU = torch.device("cpu")
SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
GROUP = 32  # the tiny models' 64 input features hold two groups (128 in released checkpoints)


def _random_checkpoint(config, path: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    return _random_checkpoint(Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False),
                              tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _random_checkpoint(LlamaConfig(**SMALL, attention_bias=True, tie_word_embeddings=True),
                              tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------- unpacking vs the formats' packers

def _fill(layer: Linear, tensors: dict[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        getattr(layer, name).data = tensor


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_unpacking_matches_the_formats_packing(method: str) -> None:
    k, n = 64, 48
    q = torch.randint(0, 16, (k, n))
    zeros = torch.randint(1 if method == "gptq" else 0, 16, (k // GROUP, n))  # GPTQ v1 stores zero - 1
    scales = torch.rand(k // GROUP, n).half()
    if method == "awq":
        layer = Linear(k, n, False, torch.float32, AWQMethod(GROUP))
        _fill(layer, {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales.float()})
    else:
        layer = Linear(k, n, False, torch.float32, GPTQMethod(GROUP))
        _fill(layer, {"qweight": pack_gptq_rows(q), "qzeros": pack_gptq_cols(zeros - 1), "scales": scales.float()})
    layer.quant.process_weights_after_loading(layer)
    assert torch.equal(reference.unpack_int4_rows(layer.qweight), q.int())
    assert torch.equal(layer.zeros, zeros.float())
    x = torch.randn(3, k)
    weight = (q - zeros.repeat_interleave(GROUP, 0)) * scales.float().repeat_interleave(GROUP, 0)
    torch.testing.assert_close(layer(x), x @ weight)


def test_int4_rows_packing_wraps_to_int32() -> None:
    q = torch.full((8, 2), 15)
    assert pack_int4_rows(q).tolist() == [[-1, -1]]
    assert torch.equal(pack_int4_rows(q), pack_gptq_rows(q))


def test_quantized_parameters_shard_with_their_packing() -> None:
    """Rank 1 of 2: a fused layer's packed columns and a row-parallel layer's groups."""
    tp = TensorParallelGroup(rank=1, world_size=2)
    parts = {"gate_proj": Shard(0, 128, 64, 64), "up_proj": Shard(0, 128, 64, 64)}
    fused = MergedColumnParallelLinear(64, parts, False, torch.float32, AWQMethod(GROUP))
    assert fused.checkpoint_shards("qweight")["up_proj"] == Shard(1, 16, 8, 8, offset=8)
    assert fused.checkpoint_shards("scales")["up_proj"] == Shard(1, 128, 64, 64, offset=64)
    row = RowParallelLinear(128, 64, False, torch.float32, tp, GPTQMethod(GROUP))
    assert row.checkpoint_shards("qweight")[None] == Shard(0, 16, 8, 8)
    assert row.checkpoint_shards("qzeros")[None] == Shard(0, 4, 2, 2)
    assert row.checkpoint_shards("scales")[None] == Shard(0, 4, 2, 2)


# ----------------------------------------------------------------- whole checkpoints

@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq-asym"])
def test_4bit_checkpoint_matches_transformers_on_its_dequantized_weights(fmt, llama_dir, tmp_path):
    dequantized = write_quantized(llama_dir, tmp_path / fmt, fmt, GROUP)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in dequantized.items():
            hf.get_parameter(name).copy_(weight)
    tokens = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits[0]
    ours = prompt_logits(tmp_path / fmt, [tokens[0].tolist()], torch.float32, CPU)[0]
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=2e-4)


# Mean KL (nats) each format must stay under on the tiny random Qwen3, and the top-1 agreement
# it must reach. Measured: fp8-kv 0.003 / 89%, fp8 0.015 / 71%, 4-bit 0.07-0.09 / 53%. The
# random model's next-token distributions are nearly flat (many near-ties), so top-1 agreement
# is a coarse measure here; the KL bounds are what catch a wrong scale or a misread layout
# (a wrong nibble order gives a KL of several nats).
BOUNDS = {"fp8-kv": (0.01, 0.8), "fp8": (0.04, 0.6), "fp8-channel": (0.04, 0.6),
          "fp8-tensor-static": (0.04, 0.6), "fp8-block": (0.05, 0.6), "awq": (0.15, 0.4),
          "gptq": (0.15, 0.4), "gptq-asym": (0.15, 0.4)}


def test_accuracy_of_every_format_on_a_tiny_qwen3(qwen3_dir, tmp_path):
    results = evaluate(qwen3_dir, list(BOUNDS), torch.float32, CPU, num_prompts=4, max_len=48,
                       group_size=GROUP, work_dir=tmp_path)
    for fmt, (max_kl, min_top1) in BOUNDS.items():
        acc = results[fmt]
        assert acc.mean_kl < max_kl and acc.top1_agreement >= min_top1, (fmt, acc)
    # FP8 checkpoints hold what --quantization fp8 computes on the fly (same per-channel scales).
    assert results["fp8-channel"] == results["fp8"]


def test_fp8_kv_cache_on_the_default_model(default_model_dir):
    from load_tests.quant_accuracy import prompt_token_ids

    prompts = prompt_token_ids(default_model_dir, 4, 48, 49152)
    ref = prompt_logits(default_model_dir, prompts, torch.float32, CPU)
    acc = compare(ref, prompt_logits(default_model_dir, prompts, torch.float32, CPU, kv_cache_dtype="fp8"))
    # Measured 0.007 nats and 95% over 8 prompts (the e4m3 mantissa's 3 bits; see docs/benchmarks.md).
    assert acc.mean_kl < 0.015 and acc.top1_agreement >= 0.9, acc


def test_compare_splits_out_the_continuation_positions() -> None:
    # Two sequences of 5 and 4 positions after prompts of 3 and 2 tokens: positions 2..3 and
    # 1..2 predict continuation tokens (the last position predicts past the sequence).
    reference = [torch.randn(5, 7), torch.randn(4, 7)]
    quantized = [r.clone() for r in reference]
    quantized[0][2] = -reference[0][2]  # one continuation position flips its argmax
    quantized[1][0] = -reference[1][0]  # one prompt position does
    acc = compare(reference, quantized, prompt_lens=[3, 2])
    assert acc.num_positions == 9 and acc.top1_agreement == pytest.approx(7 / 9)
    assert acc.generated.num_positions == 4 and acc.generated.top1_agreement == pytest.approx(3 / 4)


def test_checkpoint_kv_scales_reach_the_attention_layers(qwen3_dir, tmp_path):
    write_quantized(qwen3_dir, tmp_path / "static", "fp8-tensor-static", GROUP)
    model = load_model(tmp_path / "static", torch.float32, CPU)
    scales = [(layer.k_scale, layer.v_scale) for layer in model.attention_layers()]
    assert all(k != 1.0 and v != 1.0 and k > 0 and v > 0 for k, v in scales), scales


# ----------------------------------------------------------------- dummy weights, refusals

@pytest.mark.parametrize("fmt", ["fp8", "awq", "gptq", "fp8-block"])
def test_dummy_weights_with_each_method(fmt, qwen3_dir, tmp_path):
    config = json.loads((qwen3_dir / "config.json").read_text())
    if fmt != "fp8":
        from load_tests.quant_checkpoints import quantization_config
        config["quantization_config"] = quantization_config(fmt, GROUP)
    (tmp_path / "config.json").write_text(json.dumps(config))
    logits = prompt_logits(tmp_path, [[1, 2, 3]], torch.float32, CPU, dummy=True,
                           quantization="fp8" if fmt == "fp8" else None)
    assert logits[0].isfinite().all()


class _Config:
    def __init__(self, quantization_config):
        self.quantization_config = quantization_config


REFUSED = {
    "version": ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'"),
    "awq bits": ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, "bits 8"),
    "desc_act": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "desc_act true"),
    "gptq bits": ({"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": False}, "bits 3"),
    "format": ({"quant_method": "compressed-tensors", "format": "pack-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, "'pack-quantized'"),
    "method": ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_checkpoint_settings_are_refused_by_name(case):
    config, named = REFUSED[case]
    with pytest.raises(ValueError, match=named):
        linear_method(_Config(config), None, torch.float32, CPU)


def test_quantization_flag_must_match_the_checkpoint():
    with pytest.raises(ValueError, match="quantization 'awq' needs a checkpoint quantized with it"):
        linear_method(_Config(None), "awq", torch.float32, CPU)
    with pytest.raises(ValueError, match="does not match the checkpoint's quantization_config.quant_method 'gptq'"):
        linear_method(_Config({"quant_method": "gptq", "bits": 4, "group_size": 128}), "fp8", torch.float32, CPU)


def test_config_refuses_unknown_values_and_quantized_gguf():
    from engine_core.config import EngineConfig

    with pytest.raises(ValueError, match="quantization.*None with a GGUF file"):
        EngineConfig(model="/models/x.Q4_K_M.gguf", quantization="fp8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int3")


def test_engine_serves_an_awq_checkpoint_with_an_fp8_kv_cache(llama_dir, tmp_path):
    """Through the engine: the worker sizes an FP8 cache (1 byte a value) and generates."""
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    write_quantized(llama_dir, tmp_path / "awq", "awq", GROUP)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    blocks = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(str(tmp_path / "awq"), kv_cache_dtype=kv_cache_dtype, kv_cache_memory=1 << 20, block_size=16)
        blocks[kv_cache_dtype] = llm.engine.ready.num_kv_blocks
        [out] = llm.generate([[5, 6, 7, 8]], params)
        assert len(out.token_ids) == 8
        llm.engine.shutdown()
    assert blocks["fp8"] == 4 * blocks["auto"]  # float32 on the CPU: 4 bytes a value


def test_engine_start_refuses_an_unsupported_checkpoint(llama_dir, tmp_path):
    from engine_core.llm import LLM

    write_quantized(llama_dir, tmp_path / "awq", "awq", GROUP)
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (tmp_path / "awq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="awq quantization_config.version 'gemv' is not supported"):
        LLM(str(tmp_path / "awq"))
