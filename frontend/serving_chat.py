"""POST /v1/chat/completions: messages rendered by the chat template, answered with chat choices."""

from __future__ import annotations

import msgspec
from aiohttp import web

from frontend.generation import Generation, new_request_id
from frontend.generation_response import ResponseShape, respond
from frontend.logprobs import chat_logprobs
from frontend.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    DeltaMessage,
    Usage,
)
from frontend.output_processor import ChoiceDelta
from frontend.prompts import chat_prompt, check_max_tokens
from frontend.structured_outputs import check_structured_outputs
from frontend.request_body import decode_body
from frontend.server_state import ServerState
from frontend.tokenizer import ModelTokenizer


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
    structured_outputs = await check_structured_outputs(state, body)
    params = body.sampling_params(max_tokens, num_top if body.logprobs else None, None, state.ready.vocab_size,
                                  structured_outputs)
    generation = Generation(state, new_request_id("chatcmpl"), body, [prompt], [params])
    shape = ChatShape(generation.request_id, model, state.tokenizer, num_top)
    return await respond(request, body, generation, shape, len(prompt))


class ChatShape(ResponseShape[ChatChunkChoice, ChatChoice]):
    def __init__(self, request_id: str, model: str, tokenizer: ModelTokenizer, num_top: int) -> None:
        super().__init__(request_id, model)
        self.tokenizer = tokenizer
        self.num_top = num_top  # top_logprobs

    def opening_choices(self, num_choices: int) -> list[ChatChunkChoice]:
        # As OpenAI: each choice's first chunk gives the role and no text yet.
        return [ChatChunkChoice(index, DeltaMessage(role="assistant", content="")) for index in range(num_choices)]

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> ChatChunkChoice | None:
        text = delta.text
        if not text and delta.logprobs is None and not delta.finished:
            return None  # only part of a character so far
        message = DeltaMessage(content=text if text or not delta.finished else None)
        return ChatChunkChoice(index, message, self._logprobs(delta), delta.finish_reason, delta.stop_reason)

    def final_choice(self, index: int, total: ChoiceDelta) -> ChatChoice:
        return ChatChoice(index, AssistantMessage(total.text), self._logprobs(total), total.finish_reason,
                          total.stop_reason)

    def chunk(self, created: int, choices: list[ChatChunkChoice], usage: Usage | None) -> msgspec.Struct:
        return ChatCompletionChunk(self.request_id, created, self.model, choices, usage)

    def response(self, created: int, choices: list[ChatChoice], usage: Usage) -> msgspec.Struct:
        return ChatCompletion(self.request_id, created, self.model, choices, usage)

    def _logprobs(self, delta: ChoiceDelta) -> ChatLogprobs | None:
        return chat_logprobs(self.tokenizer, delta.logprobs, self.num_top) if delta.logprobs else None
