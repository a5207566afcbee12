"""Structured outputs on the GPU: a batch in which every request samples under a grammar,
through CUDA graphs, the Triton bitmask kernel and the fused sampler.

    python -m pytest tests/gpu/test_structured_outputs_gpu.py -q     (skipped without CUDA)

ASYNC mode (the GPU's default) and COLLECT_FIRST (speculative decoding's) order the steps'
launches, collects and mask fills differently. Both must give every request text its grammar
accepts, and the same tokens (float32, so that no near-tie between two logits can flip with the
batch's shape).
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from engine_core.engine import StepMode
from engine_core.llm import LLM
from engine_core.protocol import SamplingParams
from load_tests.make_random_model import byte_level_tokenizer, qwen3_config
from tests.test_structured_outputs import CONSTRAINTS, conforms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BATCH = 64


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    """A random two-layer Qwen3 over a byte-level vocabulary of 151,936 tokens (any text encodes)."""
    path = tmp_path_factory.mktemp("tiny-byte-level")
    config = qwen3_config(tiny=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    byte_level_tokenizer(config.vocab_size).save_pretrained(path)
    return str(path)


def test_every_row_conforms_and_the_step_modes_agree(model_path):
    llm = LLM(model_path, dtype="float32", max_model_len=256)
    rng = random.Random(0)
    prompts = [[rng.randrange(300, 150000) for _ in range(rng.randrange(4, 40))] for _ in range(BATCH)]
    # Greedy and sampled rows (seeded: their tokens depend on neither the batch nor the mode).
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0, seed=i, max_tokens=96,
                             structured_outputs=CONSTRAINTS[i % len(CONSTRAINTS)]) for i in range(BATCH)]
    token_ids = {}
    for mode in (StepMode.ASYNC, StepMode.COLLECT_FIRST):
        llm.engine.set_step_mode(mode)
        outputs = llm.generate(prompts, params)
        for i, (out, p) in enumerate(zip(outputs, params)):
            assert conforms(p.structured_outputs, out.text), (mode, i, out.text, out.finish_reason)
        token_ids[mode] = [out.token_ids for out in outputs]
    assert token_ids[StepMode.ASYNC] == token_ids[StepMode.COLLECT_FIRST]
