"""No Triton kernel compiles after start-up: every variant a step can need is compiled by the
model runner's warm-up and graph capture, so no request waits for a compile mid-run.

    python -m pytest tests/gpu/test_no_mid_run_compiles.py -q     (skipped without CUDA)

A Triton compile takes a few hundred milliseconds on an empty cache, during which the GPU
idles: mid-run, it cost the Qwen2.5-1.5B shape's reference workload a third of its throughput
(docs/benchmarks.md). The models here have that shape's head layout (12 query heads over 2 KV
heads: the attention's row counts are then divisible by 16 on some steps and not on others),
and Qwen3's 16 over 8; the workload mixes chunked prefills, decodes and batch sizes, in bf16
with CUDA graphs, as served, and once more with n-gram speculation, whose verification steps
vary the number of drafts per request.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers
import triton

from engine_core.llm import LLM
from engine_core.protocol import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIGS = {
    "qwen2-gqa6": lambda: transformers.Qwen2Config(
        hidden_size=768, num_hidden_layers=2, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=1024, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=True),
    "qwen3-gqa2": lambda: transformers.Qwen3Config(
        hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=1024, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=True),
}


@pytest.fixture(params=list(CONFIGS))
def model_path(request, tmp_path) -> str:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[request.param](), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    return str(tmp_path)


NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.mark.parametrize("speculative_config", [None, NGRAM], ids=["plain", "ngram"])
def test_a_mixed_workload_compiles_nothing_after_start_up(model_path, speculative_config):
    # A small token budget: long prompts are chunked and share steps with decodes.
    llm = LLM(model_path, max_model_len=2048, max_num_seqs=64, max_num_batched_tokens=512,
              speculative_config=speculative_config)
    compiled: list[str] = []

    def record(*args, **kwargs) -> bool:
        compiled.append(kwargs.get("repr", "?"))
        return False  # go on compiling

    rng = random.Random(0)
    previous_hook = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = record
    try:
        for batch in (1, 2, 3, 5, 16, 17, 40, 64, 100):
            # A small alphabet: prompts repeat n-grams, so the proposer finds drafts.
            prompts = [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 1500))] for _ in range(batch)]
            params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 48),
                                     ignore_eos=True) for _ in range(batch)]
            llm.generate(prompts, params)
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook
    assert not compiled, "\n".join(compiled)
