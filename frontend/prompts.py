"""From what a request gives as its prompt (messages, text, token ids) to token ids that fit the
model's context, refusing (400) a prompt that cannot fit before paying for its length."""

from __future__ import annotations

from typing import Any

from frontend.errors import APIError, invalid_param
from frontend.openai_protocol import ChatMessage
from frontend.server_state import ServerState
from frontend.tokenizer import ModelTokenizer


async def chat_prompt(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool,
                      continue_final_message: bool = False,
                      template_kwargs: dict[str, Any] | None = None,
                      tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The conversation's token ids: rendered by the chat template (with the tools, where the
    request has some) and tokenized, off the loop."""
    text = await state.tokenizer.render_chat(messages, add_generation_prompt, continue_final_message,
                                             template_kwargs, tools)
    check_text_fits(state.tokenizer, state.ready.max_model_len, text, "messages")
    # The template writes the special tokens (BOS included) itself.
    return await state.tokenizer.encode(text, add_special_tokens=False)


async def text_prompt(state: ServerState, text: str, add_special_tokens: bool = True) -> list[int]:
    check_text_fits(state.tokenizer, state.ready.max_model_len, text, "prompt")
    return await state.tokenizer.encode(text, add_special_tokens)


async def completion_prompts(state: ServerState, items: list[str | list[int]],
                             echo: bool) -> list[tuple[str, list[int]]]:
    """Each prompt of a completions request as (its text, for echo, or "" without echo; its
    token ids). A prompt too long for the context is refused before the work its length costs
    (tokenizing it, or decoding it for echo)."""
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = await text_prompt(state, item)
        else:
            ids = item  # non-empty, ids >= 0 (CompletionRequest)
            check_in_vocabulary(ids, state.ready.vocab_size, "prompt", "prompt token ids")
        if not ids:
            raise invalid_param("prompt", "prompt must not be empty")
        check_max_tokens(state.ready.max_model_len, len(ids), None, "max_tokens", "prompt")  # the prompt alone fits
        text = ""
        if echo:
            text = item if isinstance(item, str) else await state.tokenizer.decode(ids, skip_special_tokens=False)
        prompts.append((text, ids))
    return prompts


def check_in_vocabulary(token_ids: list[int], vocab_size: int, param: str, what: str) -> None:
    """Refuse ids past the vocabulary. The request structs' bounds already hold them >= 0, so
    only the largest needs looking at."""
    if token_ids and (largest := max(token_ids)) >= vocab_size:
        raise invalid_param(param, f"{what} must be in [0, {vocab_size}), got {largest}")


def check_max_tokens(max_model_len: int, num_prompt_tokens: int, max_tokens: int | None,
                     max_tokens_name: str, prompt_name: str) -> int:
    """Return the completion budget: as asked (its msgspec bounds make it >= 1), or whatever
    room the context leaves."""
    if max_tokens is None:
        if num_prompt_tokens >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, "
                           f"you requested {num_prompt_tokens} tokens in the {prompt_name}, which leaves no "
                           f"room for the completion. Please reduce the length of the {prompt_name}.",
                           param=prompt_name, code="context_length_exceeded")
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                       f"{prompt_name}, {max_tokens} in the completion). Please reduce the length of the "
                       f"{prompt_name} or completion.", param=prompt_name, code="context_length_exceeded")
    return max_tokens


def check_text_fits(tokenizer: ModelTokenizer, max_model_len: int, text: str, prompt_name: str) -> None:
    """Refuse a text too long for the context whatever its tokens, before tokenizing it:
    that takes seconds for megabytes."""
    num_bytes = len(text.encode())
    if num_bytes > max_model_len * tokenizer.max_token_bytes:
        min_tokens = -(-num_bytes // tokenizer.max_token_bytes)
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, the "
                       f"{prompt_name} is {num_bytes} bytes long, which is at least {min_tokens} tokens (no token "
                       f"covers more than {tokenizer.max_token_bytes} bytes). Please reduce the length of the "
                       f"{prompt_name}.", param=prompt_name, code="context_length_exceeded")
