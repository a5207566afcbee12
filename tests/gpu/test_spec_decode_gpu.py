"""Speculative decoding on a GPU: verification through CUDA graphs and the Triton rejection
kernel must keep greedy outputs identical to transformers, a draft model equal to the target
must have every draft accepted, and sampled requests must run through the kernel.

    python -m pytest tests/gpu/test_spec_decode_gpu.py -q -s
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tests.gpu.test_engine_gpu import VOCAB, checkpoint  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def prompts_with_repeats(num: int) -> list[list[int]]:
    rng = random.Random(2)
    prompts = []
    for _ in range(num):
        phrase = [rng.randrange(VOCAB) for _ in range(rng.randint(4, 12))]
        prompts.append([rng.randrange(VOCAB) for _ in range(rng.randint(1, 200))] + phrase * 3)
    return prompts


def run(llm, prompts, params) -> tuple[list[list[int]], dict[str, int]]:
    from engine_core.protocol import EngineCoreRequest

    engine = llm.engine
    tokens = {f"g{i}": [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineCoreRequest(f"g{i}", prompt, params))
    counts = {"draft_tokens": 0, "accepted": 0}
    while engine.has_unfinished_requests():
        out = engine.step()
        counts["draft_tokens"] += out.scheduler_stats.spec_num_draft_tokens
        counts["accepted"] += out.scheduler_stats.spec_num_accepted_tokens
        for o in out.outputs:
            tokens[o.request_id].extend(o.new_token_ids)
    return list(tokens.values()), counts


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_matches_transformers_fp32(checkpoint, enforce_eager, method):  # noqa: F811
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    hf_cpu, path = checkpoint
    hf = copy.deepcopy(hf_cpu).to("cuda")
    spec = NGRAM if method == "ngram" else {"method": "draft_model", "model": str(path), "num_speculative_tokens": 4}
    llm = LLM(str(path), dtype="float32", max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=16,
              enforce_eager=enforce_eager, kv_cache_memory=1 << 30, speculative_config=spec)
    prompts = prompts_with_repeats(12)
    got, counts = run(llm, prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))
    mismatches = 0
    for prompt, tokens in zip(prompts, got):
        ref = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=32, do_sample=False)
        mismatches += tokens != ref[0, len(prompt):].tolist()
    print(f"\n{method}, {'eager' if enforce_eager else 'graphs'}: accepted {counts['accepted']} of "
          f"{counts['draft_tokens']} drafts")
    assert mismatches == 0
    assert counts["accepted"] > 0
    if method == "draft_model":  # the draft is the target itself
        assert counts["accepted"] == counts["draft_tokens"]


def test_sampled_requests_through_the_rejection_kernel(checkpoint):  # noqa: F811
    from engine_core.llm import LLM
    from engine_core.protocol import SamplingParams

    _, path = checkpoint
    llm = LLM(str(path), dtype="bfloat16", max_model_len=1024, max_num_seqs=16, kv_cache_memory=1 << 30,
              speculative_config=NGRAM)
    prompts = prompts_with_repeats(8)
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=3, max_tokens=32, ignore_eos=True, logprobs=1)
    first, counts = run(llm, prompts, params)
    # Seeded requests repeat their tokens given the same steps. In bfloat16 a step's logits
    # depend on its batch's shapes, which prefix-cache hits would change: start from a cold cache.
    llm.engine.reset_prefix_cache()
    again, _ = run(llm, prompts, params)
    assert first == again
    assert counts["draft_tokens"] > 0
    assert all(len(t) == 32 and all(0 <= x < VOCAB for x in t) for t in first)
