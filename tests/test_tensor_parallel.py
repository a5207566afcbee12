"""Tensor parallelism end to end on the CPU: the engine starts one worker process per rank
(gloo), and greedy generation equals TP=1's and transformers', with chunked prefill, prefix
caching and n-gram speculation all on. A killed rank fails the engine's step at once and
takes nobody's process with it but its own engine's."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from engine_core.executor import WorkerFailedError
from engine_core.llm import LLM
from engine_core.protocol import EngineCoreRequest, SamplingParams
from test_model_loading import SMALL, tiny_model
from test_server import engine_is_gone
from test_spec_decode import run

MAX_TOKENS = 24
# Shapes chosen for what sharding must get right: KV heads split across ranks (2 heads at TP=2),
# and replicated (2 heads at TP=4), Qwen3's per-head q/k norms, a tied embedding.
CASES = {
    "llama-tp2": (LlamaConfig(**SMALL, tie_word_embeddings=True), 2),
    "qwen3-tp2": (Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=False), 2),
    "qwen2-kv2-tp4": (Qwen2Config(**SMALL, tie_word_embeddings=False), 4),
}
# Repeated phrases give prompt lookup matches; the shared head gives prefix-cache hits.
HEAD = [3, 17, 200, 42, 256, 9, 77, 130, 5, 250, 19, 64, 88, 101, 7, 45]
PROMPTS = [HEAD + [11, 22, 33, 11, 22, 33], HEAD + [8, 9, 10], [31, 41, 59, 26, 53, 58, 97, 93, 23, 84]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
ENGINE_ARGS = dict(max_num_batched_tokens=16, block_size=8, kv_cache_memory=1 << 20)


def transformers_greedy(model, prompt: list[int]) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_tp1_and_transformers(case, tmp_path):
    config, tp_size = CASES[case]
    reference = tiny_model(config, seed=3)
    reference.save_pretrained(tmp_path)
    expected = [transformers_greedy(reference, prompt) for prompt in PROMPTS]

    single = LLM(str(tmp_path), **ENGINE_ARGS)
    assert [out.token_ids for out in single.generate(PROMPTS, GREEDY)] == expected

    llm = LLM(str(tmp_path), tensor_parallel_size=tp_size, **ENGINE_ARGS,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    try:
        tokens, counts = run(llm, PROMPTS, GREEDY)
        assert tokens == expected
        assert counts["drafts"] > 0 and counts["accepted"] > 0
        # A second pass reuses the first's KV blocks of the shared head.
        again = llm.generate(PROMPTS[0], GREEDY)[0]
        assert again.token_ids == expected[0] and again.num_cached_tokens >= len(HEAD)
    finally:
        llm.engine.shutdown()


def rank_pids(llm: LLM) -> list[int]:
    return [proc.pid for proc in llm.engine.executor.procs]


def test_a_killed_rank_fails_the_step_at_once_and_leaves_no_orphan(tmp_path):
    tiny_model(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE_ARGS)
    pids = rank_pids(llm)
    assert llm.generate(PROMPTS[0], GREEDY)[0].finish_reason == "length"

    os.kill(pids[1], signal.SIGKILL)
    llm.engine.add_request(EngineCoreRequest("after-the-kill", PROMPTS[1], GREEDY))
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match=rf"rank 1 \(pid {pids[1]}\) exited with code -9"):
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
    assert time.monotonic() - start < 1.5

    llm.engine.shutdown()
    deadline = time.monotonic() + 10
    while not all(engine_is_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, "a rank outlived its engine"
        time.sleep(0.05)


def test_bad_sharding_is_one_clear_error(tmp_path):
    tiny_model(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape("tensor_parallel_size 3 must divide num_attention_heads 4")):
        LLM(str(tmp_path), tensor_parallel_size=3, **ENGINE_ARGS)
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        LLM(str(tmp_path), tensor_parallel_size=2, distributed_executor_backend="uni")


def test_worker_process_at_tp1_equals_in_process(tmp_path):
    """--distributed-executor-backend mp at TP=1: the worker-process path alone, as measured
    against the in-process one on the GPU."""
    reference = tiny_model(LlamaConfig(**SMALL), seed=4)
    reference.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), distributed_executor_backend="mp", **ENGINE_ARGS)
    try:
        assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == \
            [transformers_greedy(reference, p) for p in PROMPTS]
    finally:
        llm.engine.shutdown()


def test_dummy_weights_need_no_checkpoint(tmp_path):
    LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)  # config.json alone
    assert not list(Path(tmp_path).glob("*.safetensors"))
    llm = LLM(str(tmp_path), load_format="dummy", **ENGINE_ARGS)
    out = llm.generate(PROMPTS[0], GREEDY)[0]
    assert len(out.token_ids) == MAX_TOKENS and all(0 <= t < SMALL["vocab_size"] for t in out.token_ids)
