"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from aiohttp import web

from frontend.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    DeltaMessage,
)
from frontend.serving import (
    Generation,
    ServerState,
    chat_logprobs,
    chat_prompt,
    check_max_tokens,
    child_params,
    decode_body,
    json_response,
    new_request_id,
    sse_event,
    stream_sse,
    usage,
)


async def create_chat_completion(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await decode_body(request, ChatCompletionRequest)
    body.check(state.trust_request_chat_template)
    model = state.check_model(body.model)
    state.admission.check_request_size(1, body.n)
    prompt = await chat_prompt(state, body.messages, body.add_generation_prompt, body.continue_final_message,
                               body.chat_template_kwargs)
    name, requested = body.requested_max_tokens()
    max_tokens = check_max_tokens(state.ready.max_model_len, len(prompt), requested, name, "messages")
    num_top = body.top_logprobs or 0
    params = body.sampling_params(max_tokens, num_top if body.logprobs else None, None, state.ready.vocab_size)
    generation = Generation(state, new_request_id("chatcmpl"), [prompt] * body.n,
                            [child_params(params, i) for i in range(body.n)], body.stop_strings(),
                            body.include_stop_str_in_output, body.skip_special_tokens, body.request_timeout)
    try:
        if body.stream:
            return await stream_sse(request, _stream(state, body, generation, model, len(prompt), num_top))
        return await _complete(state, body, generation, model, len(prompt), num_top)
    finally:
        generation.close()


async def _complete(state: ServerState, body: ChatCompletionRequest, generation: Generation, model: str,
                    num_prompt_tokens: int, num_top: int) -> web.Response:
    total = await generation.collect()
    choices = []
    for index in range(body.n):
        delta = total[index]
        logprobs = chat_logprobs(state.tokenizer, delta.logprobs, num_top) if delta.logprobs else None
        choices.append(ChatChoice(index, AssistantMessage(delta.text), logprobs, delta.finish_reason,
                                  delta.stop_reason))
    num_output_tokens = sum(delta.num_output_tokens for delta in total.values())
    return json_response(ChatCompletion(generation.request_id, int(time.time()), model, choices,
                                        usage(num_prompt_tokens, num_output_tokens)))


async def _stream(state: ServerState, body: ChatCompletionRequest, generation: Generation, model: str,
                  num_prompt_tokens: int, num_top: int) -> AsyncGenerator[bytes, None]:
    options = body.stream_options
    include_usage = options is not None and options.include_usage
    continuous_usage = include_usage and options is not None and options.continuous_usage_stats
    request_id, created = generation.request_id, int(time.time())
    num_output_tokens = [0] * body.n
    yield b"".join(sse_event(ChatCompletionChunk(request_id, created, model,
                                                 [ChatChunkChoice(i, DeltaMessage(role="assistant", content=""))]))
                   for i in range(body.n))
    while not generation.done:
        events = []
        for index, delta in sorted((await generation.next()).items()):
            if delta.error is not None:
                raise delta.error
            num_output_tokens[index] = delta.num_output_tokens
            text = delta.text
            if not text and delta.logprobs is None and not delta.finished:
                continue  # only part of a character so far
            logprobs = chat_logprobs(state.tokenizer, delta.logprobs, num_top) if delta.logprobs else None
            chunk_usage = usage(num_prompt_tokens, sum(num_output_tokens)) if continuous_usage else None
            choice = ChatChunkChoice(index, DeltaMessage(content=text if text or not delta.finished else None),
                                     logprobs, delta.finish_reason, delta.stop_reason)
            events.append(sse_event(ChatCompletionChunk(request_id, created, model, [choice], chunk_usage)))
        if events:
            yield b"".join(events)
    if include_usage:
        yield sse_event(ChatCompletionChunk(request_id, created, model, [],
                                            usage(num_prompt_tokens, sum(num_output_tokens))))
