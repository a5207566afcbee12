"""Engine logprobs (token ids and numbers) in OpenAI's two response shapes, with token texts."""

from __future__ import annotations

from engine_core.protocol import Logprobs
from frontend.openai_protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from frontend.tokenizer import ModelTokenizer


def chat_logprobs(tokenizer: ModelTokenizer, logprobs: Logprobs, num_top: int) -> ChatLogprobs:
    """OpenAI's chat shape: per token its text, logprob, bytes and the top alternatives."""
    rows = logprobs.token_ids
    flat = [t for row in rows for t in row[:num_top + 1]]
    texts = iter(tokenizer.token_strings(flat))
    content = []
    for ids, lps in zip(rows, logprobs.logprobs):
        token, *alternatives = [next(texts) for _ in ids[:num_top + 1]]
        top = [TopLogprob(text, lp, list(text.encode())) for text, lp in zip(alternatives, lps[1:])]
        content.append(TokenLogprob(token, lps[0], list(token.encode()), top))
    return ChatLogprobs(content)


def completion_logprobs(tokenizer: ModelTokenizer, logprobs: Logprobs | None, text_offset: int,
                        prompt_token_ids: list[int] | None = None,
                        prompt_logprobs: Logprobs | None = None) -> CompletionLogprobs:
    """The legacy completions shape; with `prompt_token_ids` (echo) the prompt comes first,
    its first token without a logprob as nothing precedes it."""
    rows_ids: list[list[int]] = []
    rows_lps: list[list[float]] = []
    leading_none = 0
    if prompt_token_ids is not None:
        rows_ids.append(prompt_token_ids[:1])
        rows_lps.append([])
        leading_none = 1
        if prompt_logprobs is not None:
            rows_ids += prompt_logprobs.token_ids
            rows_lps += prompt_logprobs.logprobs
        else:
            rows_ids += [[t] for t in prompt_token_ids[1:]]
            rows_lps += [[] for _ in prompt_token_ids[1:]]
    if logprobs is not None:
        rows_ids += logprobs.token_ids
        rows_lps += logprobs.logprobs
    texts = iter(tokenizer.token_strings([t for row in rows_ids for t in row]))
    result = CompletionLogprobs([], [], [], [])
    for i, (ids, lps) in enumerate(zip(rows_ids, rows_lps)):
        token = next(texts)
        alternatives = [next(texts) for _ in ids[1:]]
        result.tokens.append(token)
        result.text_offset.append(text_offset)
        text_offset += len(token)
        if i < leading_none or not lps:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(lps[0])
            result.top_logprobs.append(dict(zip([token, *alternatives], lps)))
    return result
