"""POST /v1/completions: prompts as a string, strings, token ids or lists of token ids."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from aiohttp import web

from frontend.errors import invalid_param
from frontend.openai_protocol import Completion, CompletionChoice, CompletionRequest
from frontend.serving import (
    Generation,
    ServerState,
    check_max_tokens,
    check_text_fits,
    child_params,
    completion_logprobs,
    decode_body,
    json_response,
    new_request_id,
    sse_event,
    stream_sse,
    usage,
)


async def parse_prompts(state: ServerState, items: list[str | list[int]], echo: bool) -> list[tuple[str, list[int]]]:
    """Each prompt as (its text, for echo, or "" without echo; its token ids). A prompt too
    long for the context is refused before the work its length costs (tokenizing it, or
    decoding it for echo)."""
    tokenizer, max_model_len, vocab_size = state.tokenizer, state.ready.max_model_len, state.ready.vocab_size
    prompts = []
    for item in items:
        if isinstance(item, str):
            check_text_fits(tokenizer, max_model_len, item, "prompt")
            ids = await tokenizer.encode(item)
        else:
            ids = item  # non-empty, ids >= 0 (CompletionRequest)
            if (largest := max(ids)) >= vocab_size:
                raise invalid_param("prompt", f"prompt token ids must be in [0, {vocab_size}), got {largest}")
        if not ids:
            raise invalid_param("prompt", "prompt must not be empty")
        check_max_tokens(max_model_len, len(ids), None, "max_tokens", "prompt")  # the prompt alone fits
        text = ""
        if echo:
            text = item if isinstance(item, str) else await tokenizer.decode(ids, skip_special_tokens=False)
        prompts.append((text, ids))
    return prompts


async def create_completion(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await decode_body(request, CompletionRequest)
    body.check()
    model = state.check_model(body.model)
    items = body.prompts()
    state.admission.check_request_size(len(items), body.n)
    prompts = await parse_prompts(state, items, body.echo)
    prompt_logprobs = body.logprobs if body.echo else None
    choice_prompts, choice_params = [], []
    for _, ids in prompts:
        max_tokens = check_max_tokens(state.ready.max_model_len, len(ids), body.max_tokens, "max_tokens", "prompt")
        params = body.sampling_params(max_tokens, body.logprobs, prompt_logprobs, state.ready.vocab_size)
        choice_prompts += [ids] * body.n
        choice_params += [child_params(params, i) for i in range(body.n)]
    generation = Generation(state, new_request_id("cmpl"), choice_prompts, choice_params, body.stop_strings(),
                            body.include_stop_str_in_output, body.skip_special_tokens, body.request_timeout)
    num_prompt_tokens = sum(len(ids) for _, ids in prompts)
    try:
        if body.stream:
            return await stream_sse(request, _stream(state, body, generation, model, prompts, num_prompt_tokens))
        return await _complete(state, body, generation, model, prompts, num_prompt_tokens)
    finally:
        generation.close()


async def _complete(state: ServerState, body: CompletionRequest, generation: Generation, model: str,
                    prompts: list[tuple[str, list[int]]], num_prompt_tokens: int) -> web.Response:
    total = await generation.collect()
    choices = []
    for index in range(len(total)):
        delta = total[index]
        echo_text, prompt_ids = prompts[index // body.n]
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(state.tokenizer, delta.logprobs, 0, prompt_ids if body.echo else None,
                                           delta.prompt_logprobs)
        choices.append(CompletionChoice(index, echo_text + delta.text, logprobs, delta.finish_reason,
                                        delta.stop_reason))
    num_output_tokens = sum(delta.num_output_tokens for delta in total.values())
    return json_response(Completion(generation.request_id, int(time.time()), model, choices,
                                    usage(num_prompt_tokens, num_output_tokens)))


async def _stream(state: ServerState, body: CompletionRequest, generation: Generation, model: str,
                  prompts: list[tuple[str, list[int]]], num_prompt_tokens: int) -> AsyncGenerator[bytes, None]:
    options = body.stream_options
    include_usage = options is not None and options.include_usage
    continuous_usage = include_usage and options is not None and options.continuous_usage_stats
    request_id, created = generation.request_id, int(time.time())
    num_choices = len(prompts) * body.n
    num_output_tokens = [0] * num_choices
    text_offsets = [0] * num_choices
    echo_pending = [body.echo] * num_choices
    while not generation.done:
        events = []
        for index, delta in sorted((await generation.next()).items()):
            if delta.error is not None:
                raise delta.error
            num_output_tokens[index] = delta.num_output_tokens
            text = delta.text
            echo_ids = None
            if echo_pending[index]:
                echo_pending[index] = False
                echo_text, echo_ids = prompts[index // body.n]
                text = echo_text + text
            if not text and delta.logprobs is None and not delta.finished and echo_ids is None:
                continue  # only part of a character so far
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(state.tokenizer, delta.logprobs, text_offsets[index], echo_ids,
                                               delta.prompt_logprobs)
                text_offsets[index] += sum(map(len, logprobs.tokens))
            chunk_usage = usage(num_prompt_tokens, sum(num_output_tokens)) if continuous_usage else None
            choice = CompletionChoice(index, text, logprobs, delta.finish_reason, delta.stop_reason)
            events.append(sse_event(Completion(request_id, created, model, [choice], chunk_usage)))
        if events:
            yield b"".join(events)
    if include_usage:
        yield sse_event(Completion(request_id, created, model, [], usage(num_prompt_tokens, sum(num_output_tokens))))
