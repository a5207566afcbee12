"""POST /v1/completions: prompts as a string, strings, token ids or lists of token ids, answered
with text choices (n for each prompt, prompt by prompt)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from frontend.generation import Generation, new_request_id
from frontend.generation_response import ResponseShape, respond
from frontend.logprobs import completion_logprobs
from frontend.openai_protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage
from frontend.output_processor import ChoiceDelta
from frontend.prompts import check_max_tokens, completion_prompts
from frontend.structured_outputs import check_structured_outputs
from frontend.request_body import decode_body
from frontend.server_state import ServerState
from frontend.tokenizer import ModelTokenizer


async def create_completion(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await decode_body(request, CompletionRequest)
    body.check()
    model = state.check_model(body.model)
    items = body.prompts()
    state.admission.check_request_size(len(items), body.n)
    prompts = await completion_prompts(state, items, body.echo)
    prompt_logprobs = body.logprobs if body.echo else None
    structured_outputs = await check_structured_outputs(state, body)
    params = []
    for _, ids in prompts:
        max_tokens = check_max_tokens(state.ready.max_model_len, len(ids), body.max_tokens, "max_tokens", "prompt")
        params.append(body.sampling_params(max_tokens, body.logprobs, prompt_logprobs, state.ready.vocab_size,
                                           structured_outputs))
    generation = Generation(state, new_request_id("cmpl"), body, [ids for _, ids in prompts], params)
    shape = CompletionShape(generation.request_id, model, state.tokenizer, body, prompts)
    return await respond(request, body, generation, shape, sum(len(ids) for _, ids in prompts))


class CompletionShape(ResponseShape[CompletionChoice, CompletionChoice]):
    def __init__(self, request_id: str, model: str, tokenizer: ModelTokenizer, body: CompletionRequest,
                 prompts: list[tuple[str, list[int]]]) -> None:
        super().__init__(request_id, model)
        self.tokenizer = tokenizer
        self.n = body.n
        self.echo = body.echo
        self.num_logprobs = body.logprobs
        self.prompts = prompts  # (echo text, token ids) by prompt
        num_choices = len(prompts) * body.n
        # Streaming: a choice's first chunk carries its prompt (echo), and logprobs' text
        # offsets run on from one chunk to the next.
        self.echo_pending = [body.echo] * num_choices
        self.text_offsets = [0] * num_choices

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> CompletionChoice | None:
        text = delta.text
        echo_ids = None
        if self.echo_pending[index]:
            self.echo_pending[index] = False
            echo_text, echo_ids = self.prompts[index // self.n]
            text = echo_text + text
        if not text and delta.logprobs is None and not delta.finished and echo_ids is None:
            return None  # only part of a character so far
        logprobs = self._logprobs(delta, self.text_offsets[index], echo_ids)
        if logprobs is not None:
            self.text_offsets[index] += sum(map(len, logprobs.tokens))
        return CompletionChoice(index, text, logprobs, delta.finish_reason, delta.stop_reason)

    def final_choice(self, index: int, total: ChoiceDelta) -> CompletionChoice:
        echo_text, prompt_ids = self.prompts[index // self.n]
        logprobs = self._logprobs(total, 0, prompt_ids if self.echo else None)
        return CompletionChoice(index, echo_text + total.text, logprobs, total.finish_reason, total.stop_reason)

    def chunk(self, created: int, choices: list[CompletionChoice], usage: Usage | None) -> msgspec.Struct:
        return Completion(self.request_id, created, self.model, choices, usage)

    def response(self, created: int, choices: list[CompletionChoice], usage: Usage) -> msgspec.Struct:
        return Completion(self.request_id, created, self.model, choices, usage)

    def _logprobs(self, delta: ChoiceDelta, text_offset: int, echo_ids: list[int] | None) -> CompletionLogprobs | None:
        if self.num_logprobs is None:
            return None
        return completion_logprobs(self.tokenizer, delta.logprobs, text_offset, echo_ids, delta.prompt_logprobs)
