"""The embedded default model (SmolLM2-135M-Instruct) through the offline LLM, against
transformers on the same converted weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine_core.llm import LLM
from engine_core.protocol import SamplingParams

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "2 + 2 = ?"}],
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llm(default_model_dir) -> LLM:
    return LLM(max_num_batched_tokens=32)  # model=None: the embedded default


@torch.inference_mode()
def test_chat_greedy_matches_transformers(llm, default_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    outputs = llm.chat(CHATS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3))
    for chat, out in zip(CHATS, outputs):
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]
        ref = hf.generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)
        ref_tokens = ref.sequences[0, prompt.shape[1]:].tolist()
        assert out.token_ids == ref_tokens
        ref_logprobs = [step.log_softmax(-1)[0] for step in ref.logits]
        for token, ours, theirs in zip(out.token_ids, out.logprobs, ref_logprobs):
            for token_id, logprob in ours.items():
                assert logprob == pytest.approx(theirs[token_id].item(), abs=1e-4)
    assert "Paris" in outputs[0].text


def test_eos_finishes_with_stop(llm):
    out = llm.chat(CHATS[3], SamplingParams(temperature=0.0, max_tokens=200))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.engine.eos_token_ids
    assert out.stop_reason is None


def test_prompt_logprobs_match_transformers(llm, default_model_dir):
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog because it wants to reach the river."
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    with torch.inference_mode():
        logprobs = hf(torch.tensor([out.prompt_token_ids])).logits[0].log_softmax(-1)
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) - 1
    for i, row in enumerate(out.prompt_logprobs):
        token = out.prompt_token_ids[i + 1]
        assert next(iter(row)) == token
        assert row[token] == pytest.approx(logprobs[i, token].item(), abs=1e-4)


def test_string_and_token_prompts_agree(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    by_text = llm.generate("Once upon a time", params)[0]
    by_ids = llm.generate([by_text.prompt_token_ids], params)[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == by_ids.text != ""
