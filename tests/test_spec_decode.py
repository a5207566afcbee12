"""Speculative decoding end to end in the offline engine: greedy outputs must equal
transformers' token for token with either proposer, whatever the chunking, prefix caching,
preemption and stop conditions, while drafts are actually proposed and accepted."""

from __future__ import annotations

import copy

import pytest
import torch

from engine_core.engine import StepMode
from engine_core.llm import LLM
from engine_core.protocol import EngineCoreRequest, SamplingParams
from tests.test_engine import VOCAB, build_tiny, hf_greedy, random_prompts

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    return build_tiny("llama", path), str(path)


@pytest.fixture(scope="module")
def other_draft(target, tmp_path_factory):
    """A draft model close to the target but not equal: its weights plus noise, so some
    drafts are accepted and some rejected."""
    hf_model, _ = target
    path = tmp_path_factory.mktemp("draft")
    draft = copy.deepcopy(hf_model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * 0.3)
    draft.save_pretrained(path)
    return str(path)


def prompts_with_repeats() -> list[list[int]]:
    """Random prompts, some repeating a phrase, so prompt lookup finds matches."""
    prompts = random_prompts(6, seed=5, max_len=40)
    phrase = [11, 22, 33, 44, 55, 66, 77]
    return prompts + [p[:8] + phrase + p[8:12] + phrase[:3] for p in prompts[:3]]


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], dict[str, int]]:
    """Every request's tokens, and the speculative-decoding counters summed over the run."""
    engine = llm.engine
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineCoreRequest(f"r{i}", prompt, params))
        tokens[f"r{i}"] = []
    counts = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "preemptions": 0}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        stats = outputs.scheduler_stats
        counts["drafts"] += stats.spec_num_drafts
        counts["draft_tokens"] += stats.spec_num_draft_tokens
        counts["accepted"] += stats.spec_num_accepted_tokens
        counts["preemptions"] += stats.num_preemptions
        assert sum(stats.spec_num_accepted_tokens_per_pos) == stats.spec_num_accepted_tokens
        for out in outputs.outputs:
            tokens[out.request_id].extend(out.new_token_ids)
    kv = engine.kv_cache_manager
    assert kv.num_free_blocks == kv.block_pool.num_blocks
    return list(tokens.values()), counts


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# 2 layers x 2 (K, V) x 2 heads x 16 dims x 4 bytes x 16 tokens
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 16


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize("engine_args", [
    {},
    {"max_num_batched_tokens": 8},
    {"enable_prefix_caching": False, "block_size": 8},
    {"kv_cache_memory": 12 * BLOCK_BYTES, "max_model_len": 128},
], ids=["default", "chunked8", "no-prefix-cache-block8", "preempting"])
def test_greedy_equals_transformers(target, other_draft, method, engine_args):
    hf_model, path = target
    spec = NGRAM if method == "ngram" else {"method": "draft_model", "model": other_draft, "num_speculative_tokens": 3}
    args = {"kv_cache_memory": 1 << 24, **engine_args}
    if method == "draft_model" and "max_model_len" in args:
        args["kv_cache_memory"] *= 2  # the draft's KV shares the blocks
    llm = LLM(path, speculative_config=spec, **args)
    prompts = prompts_with_repeats()
    got, counts = run(llm, prompts, GREEDY)
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(hf_model, prompt, MAX_TOKENS)[0]
    assert counts["draft_tokens"] > 0 and counts["accepted"] > 0
    if "max_model_len" in engine_args:
        assert counts["preemptions"] > 0


def test_draft_model_equal_to_target_accepts_everything(target):
    _, path = target
    llm = LLM(path, kv_cache_memory=1 << 24,
              speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 4})
    _, counts = run(llm, random_prompts(4, seed=6), GREEDY)
    assert counts["draft_tokens"] > 0
    assert counts["accepted"] == counts["draft_tokens"]


def test_stop_token_inside_accepted_run_ends_there(target):
    _, path = target
    plain = LLM(path, kv_cache_memory=1 << 24)
    spec = LLM(path, kv_cache_memory=1 << 24, speculative_config=NGRAM)
    prompts = prompts_with_repeats()
    free_run = plain.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, free_run):
        stop = out.token_ids[MAX_TOKENS // 2]  # a token the run reaches midway (or earlier)
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop])
        expected = plain.generate([prompt], params)[0]
        got = spec.generate([prompt], params)[0]
        assert got.token_ids == expected.token_ids
        assert got.token_ids[-1] == stop and stop not in got.token_ids[:-1]
        assert (got.finish_reason, got.stop_reason) == ("stop", stop)


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_max_tokens_is_exact(target, max_tokens):
    _, path = target
    llm = LLM(path, kv_cache_memory=1 << 24, speculative_config=NGRAM, max_model_len=64)
    prompts = prompts_with_repeats()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for out in llm.generate(prompts, params):
        assert len(out.token_ids) == max_tokens and out.finish_reason == "length"
    # max_model_len bounds the drafts too: the request ends exactly at the context's end.
    long = llm.generate([list(range(60))], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert len(long.token_ids) == 4 and long.finish_reason == "length"


def test_logprobs_are_those_of_the_emitted_tokens(target):
    hf_model, path = target
    llm = LLM(path, kv_cache_memory=1 << 24, speculative_config=NGRAM)
    prompts = prompts_with_repeats()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, MAX_TOKENS)
        assert out.token_ids == ref_tokens
        assert len(out.logprobs) == MAX_TOKENS
        assert [next(iter(d.values())) for d in out.logprobs] == pytest.approx(ref_logprobs, abs=1e-4)
        assert all(len(d) in (2, 3) for d in out.logprobs)  # the token and its top 2


def test_sampled_requests_are_seeded_and_keep_processors(target):
    _, path = target
    llm = LLM(path, kv_cache_memory=1 << 24, speculative_config=NGRAM)
    prompts = prompts_with_repeats()
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)
    first, counts = run(llm, prompts, seeded)
    again, _ = run(llm, prompts, seeded)
    assert first == again
    assert counts["draft_tokens"] > 0
    assert all(len(tokens) == MAX_TOKENS and all(0 <= t < VOCAB for t in tokens) for tokens in first)
    # Requests with penalties never speculate (their distribution depends on every token before).
    penalized = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.3)
    _, counts = run(llm, prompts, penalized)
    assert counts["draft_tokens"] == 0


def test_disable_by_batch_size(target):
    _, path = target
    llm = LLM(path, kv_cache_memory=1 << 24, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    prompts = prompts_with_repeats()
    _, crowded = run(llm, prompts, GREEDY)
    _, alone = run(llm, prompts[-1:], GREEDY)
    assert crowded["draft_tokens"] < alone["draft_tokens"] * len(prompts) / 2
    assert alone["draft_tokens"] > 0


@pytest.mark.parametrize("spec,message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be in [1, 16], got 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_max must be >= prompt_lookup_min (3), got 2"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "unknown field"),
    ('{"method": "ngram", ', "must be a JSON object"),
])
def test_bad_speculative_config(target, spec, message):
    _, path = target
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        LLM(path, speculative_config=spec)


def test_speculation_excludes_async_scheduling(target):
    _, path = target
    with pytest.raises(ValueError, match="async_scheduling must be off"):
        LLM(path, speculative_config=NGRAM, async_scheduling=True)


def test_draft_model_must_share_the_vocabulary(target, tmp_path):
    _, path = target
    import transformers
    config = transformers.LlamaConfig(vocab_size=VOCAB * 2, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"vocab_size must be <= the target's \\({VOCAB}\\)"):
        LLM(path, speculative_config={"method": "draft_model", "model": str(tmp_path), "num_speculative_tokens": 2})


def test_collect_first_ordering_keeps_outputs(target):
    """On a GPU without async scheduling the engine collects a step before launching the next,
    and returns its outputs one call later; the same order on the CPU must give the same tokens."""
    hf_model, path = target
    llm = LLM(path, kv_cache_memory=1 << 24, speculative_config=NGRAM)
    llm.engine.set_step_mode(StepMode.COLLECT_FIRST)
    prompts = prompts_with_repeats()
    got, counts = run(llm, prompts, GREEDY)
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(hf_model, prompt, MAX_TOKENS)[0]
    assert counts["accepted"] > 0
