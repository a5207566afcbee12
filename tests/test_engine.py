"""The offline engine against transformers: greedy tokens and logprobs must match token for
token, whatever the batching, chunking, prefix caching or preemption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from engine_core.config import (
    CPU_SCHEDULING_LIMITS,
    GPU_SCHEDULING_LIMITS,
    LARGE_GPU_SCHEDULING_LIMITS,
    EngineConfig,
)
from engine_core.llm import LLM
from engine_core.protocol import EngineCoreRequest, FinishReason, SamplingParams

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
}
VOCAB = 512


def build_tiny(arch: str, path: Path) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=arch == "qwen3", **extra)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = None  # greedy runs to max_new_tokens, as ignore_eos
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return build_tiny(request.param, path), str(path)


def random_prompts(n: int, seed: int, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [step.float().log_softmax(-1)[0, t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)


@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 8},
    {"enable_prefix_caching": False},
    {"block_size": 8, "max_num_seqs": 3},
    {"async_scheduling": True, "max_num_batched_tokens": 16},
], ids=["default", "chunked8", "no-prefix-cache", "block8-seqs3", "async-chunked16"])
def test_greedy_matches_transformers(tiny, engine_args):
    hf_model, path = tiny
    llm = LLM(path, kv_cache_memory=1 << 24, **engine_args)
    prompts = random_prompts(6, seed=1)
    prompts.append(prompts[0][:5] + [7] * 20)  # shares a prefix with the first
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, GREEDY.max_tokens)
        assert out.token_ids == ref_tokens
        assert out.finish_reason == "length"
        ours = [next(iter(d.values())) for d in out.logprobs]  # the sampled token comes first
        assert ours == pytest.approx(ref_logprobs, abs=1e-4)


def test_batch_of_32_equals_each_alone(tiny):
    _, path = tiny
    llm = LLM(path, kv_cache_memory=1 << 24, max_num_batched_tokens=64)
    prompts = random_prompts(32, seed=2, max_len=100)
    batched = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts[:8], batched):
        assert llm.generate([prompt], GREEDY)[0].token_ids == out.token_ids
    assert len({tuple(o.token_ids) for o in batched}) > 1


def run_counting_preemptions(llm: LLM, prompts: list[list[int]], params: SamplingParams):
    engine = llm.engine
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineCoreRequest(f"p{i}", prompt, params))
        tokens[f"p{i}"] = []
    preemptions = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        preemptions += outputs.scheduler_stats.num_preemptions
        for out in outputs.outputs:
            tokens[out.request_id].extend(out.new_token_ids)
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.block_pool.num_blocks
    return list(tokens.values()), preemptions


@pytest.mark.parametrize("caching,async_scheduling", [(True, False), (False, False), (True, True)])
def test_preemption_keeps_outputs(tiny, caching, async_scheduling):
    hf_model, path = tiny
    # 160 tokens of KV (a block holds 2 layers x 2 x 2 heads x 16 dims x 4 bytes x 16 tokens)
    # for 8 requests of up to ~70 tokens each: the scheduler must preempt.
    block_bytes = 2 * 2 * 2 * 16 * 4 * 16
    llm = LLM(path, kv_cache_memory=10 * block_bytes, max_model_len=128, enable_prefix_caching=caching,
              async_scheduling=async_scheduling)
    prompts = random_prompts(8, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    got, preemptions = run_counting_preemptions(llm, prompts, params)
    assert preemptions > 0
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(hf_model, prompt, 10)[0]


def test_prefix_cache_computes_only_new_blocks(tiny):
    _, path = tiny
    llm = LLM(path, kv_cache_memory=1 << 24, block_size=16)
    shared = list(range(100, 180))  # 80 tokens = 5 blocks
    first = llm.generate([shared + [1, 2, 3]], GREEDY)[0]
    second = llm.generate([shared + [4, 5, 6, 7]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 80
    off = LLM(path, kv_cache_memory=1 << 24, enable_prefix_caching=False)
    assert off.generate([shared + [4, 5, 6, 7]], GREEDY)[0].token_ids == second.token_ids


def test_seeded_sampling_is_batch_independent(tiny):
    _, path = tiny
    llm = LLM(path, kv_cache_memory=1 << 24)
    pipelined = LLM(path, kv_cache_memory=1 << 24, async_scheduling=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    alone = llm.generate([prompt], seeded)[0].token_ids
    others = random_prompts(7, seed=5)
    params = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * 7
    batched = llm.generate(others[:3] + [prompt] + others[3:], params[:3] + [seeded] + params[3:])
    assert batched[3].token_ids == alone
    assert pipelined.generate(others[:3] + [prompt] + others[3:], params[:3] + [seeded] + params[3:])[3].token_ids == alone
    other_seed = llm.generate([prompt], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99,
                                                       max_tokens=12, ignore_eos=True))[0].token_ids
    assert other_seed != alone


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_conditions(tiny, async_scheduling):
    hf_model, path = tiny
    llm = LLM(path, kv_cache_memory=1 << 24, async_scheduling=async_scheduling)
    prompt = [3, 1, 4, 1, 5]
    ref, _ = hf_greedy(hf_model, prompt, 10)
    stop_at = ref[4]
    first = ref.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == ref[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    # min_tokens bans the stop token until enough tokens are out.
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, min_tokens=first + 1,
                                                stop_token_ids=[stop_at]))[0]
    assert stop_at not in out.token_ids[:first + 1]
    assert len(out.token_ids) > first + 1


def test_bad_requests_fail_before_work_and_spare_others(tiny):
    _, path = tiny
    llm = LLM(path, kv_cache_memory=1 << 24, max_model_len=64)
    cases = [
        ([1] * 65, SamplingParams(), "maximum context length is 64"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens must be >= 1, got 0"),
        ([1, 2], SamplingParams(temperature=-0.5), "temperature"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p must be (0, 1], got 0.0"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p"),
        ([1, 2], SamplingParams(top_k=-2), "top_k"),
        ([1, 2.5], SamplingParams(), "2.5"),
        ([1, VOCAB], SamplingParams(), f"[0, {VOCAB})"),
        ([], SamplingParams(), "at least one token"),
        ([1, 2], SamplingParams(logit_bias={VOCAB + 3: 1.0}), "logit_bias"),
    ]
    for prompt, params, message in cases:
        with pytest.raises(ValueError) as info:
            llm.generate([[5, 6, 7], prompt], params)
        assert message in str(info.value)
        assert not llm.engine.has_unfinished_requests()
    # Through the engine, a bad request finishes with an error and the good one completes.
    engine = llm.engine
    engine.add_request(EngineCoreRequest("bad", [1] * 65, SamplingParams()))
    engine.add_request(EngineCoreRequest("good", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True)))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            if out.finished:
                finished[out.request_id] = out
    assert finished["bad"].finish_reason == FinishReason.ERROR
    assert "64" in finished["bad"].error
    assert finished["good"].finish_reason == FinishReason.LENGTH


def test_abort_frees_blocks(tiny):
    _, path = tiny
    llm = LLM(path, kv_cache_memory=1 << 24)
    engine = llm.engine
    free_idle = engine.kv_cache_manager.num_free_blocks
    engine.add_request(EngineCoreRequest("a", list(range(40)), SamplingParams(max_tokens=100, ignore_eos=True)))
    engine.step()
    assert engine.kv_cache_manager.num_free_blocks < free_idle
    engine.abort_requests(["a"])
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache_manager.num_free_blocks == free_idle


def test_scheduling_limits_come_from_the_device_unless_given(tiny):
    _, path = tiny
    engine = LLM(path).engine
    assert (engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens) == CPU_SCHEDULING_LIMITS
    assert (engine.ready.max_num_seqs, engine.ready.max_num_batched_tokens) == CPU_SCHEDULING_LIMITS
    engine = LLM(path, max_num_seqs=3, max_num_batched_tokens=40).engine
    assert (engine.ready.max_num_seqs, engine.ready.max_num_batched_tokens) == (3, 40)
    # The GPU defaults, by the device's memory (no GPU here to start an engine on).
    assert EngineConfig().scheduling_limits("cuda", 141 << 30) == LARGE_GPU_SCHEDULING_LIMITS == (256, 16384)
    assert EngineConfig().scheduling_limits("cuda", 24 << 30) == GPU_SCHEDULING_LIMITS == (256, 8192)
    assert EngineConfig(max_num_seqs=64).scheduling_limits("cuda", 141 << 30) == (64, 16384)
