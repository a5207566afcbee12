"""POST /v1/chat/completions: messages rendered by the chat template, answered with chat choices."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from aiohttp import web

from frontend.errors import invalid_param
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
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    Usage,
)
from frontend.output_processor import ChoiceDelta
from frontend.prompts import chat_prompt, check_max_tokens
from frontend.request_body import decode_body
from frontend.server_state import ServerState
from frontend.structured_outputs import check_structured_outputs
from frontend.tokenizer import ModelTokenizer
from frontend.tool_calling import plan_tool_calls, template_tools
from frontend.tool_parsers import ToolParser
from frontend.tool_parsers.base import ParsedDelta, ToolCallDelta


async def create_chat_completion(state: ServerState, request: web.Request) -> web.StreamResponse:
    body = await decode_body(request, ChatCompletionRequest)
    body.check(state.trust_request_chat_template)
    model = state.check_model(body.model)
    state.admission.check_request_size(1, body.n)
    tool_plan = plan_tool_calls(body, state.tool_calling)
    prompt = await chat_prompt(state, body.messages, body.add_generation_prompt, body.continue_final_message,
                               body.chat_template_kwargs, template_tools(body.tools))
    name, requested = body.requested_max_tokens()
    max_tokens = check_max_tokens(state.ready.max_model_len, len(prompt), requested, name, "messages")
    num_top = body.top_logprobs or 0
    structured_outputs = await check_structured_outputs(state, body)
    if tool_plan is not None and tool_plan.structured_outputs is not None:
        if structured_outputs is not None:
            raise invalid_param("tool_choice", "tool_choice 'required' or a named function sets the output's "
                                "shape and cannot be combined with response_format or structured_outputs")
        structured_outputs = tool_plan.structured_outputs
        await state.tokenizer.check_grammar("tools", structured_outputs, state.ready.vocab_size,
                                            state.ready.eos_token_ids)
    if tool_plan is not None and tool_plan.needs_special_tokens:
        body.skip_special_tokens = False  # the calls' marker is one, and must reach the parser
    params = body.sampling_params(max_tokens, num_top if body.logprobs else None, None, state.ready.vocab_size,
                                  structured_outputs)
    generation = Generation(state, new_request_id("chatcmpl"), body, [prompt], [params])
    shape = ChatShape(generation.request_id, model, state.tokenizer, num_top,
                      None if tool_plan is None else tool_plan.make_parser)
    return await respond(request, body, generation, shape, len(prompt))


class ChatShape(ResponseShape[ChatChunkChoice, ChatChoice]):
    def __init__(self, request_id: str, model: str, tokenizer: ModelTokenizer, num_top: int,
                 make_tool_parser: Callable[[], ToolParser] | None = None) -> None:
        super().__init__(request_id, model)
        self.tokenizer = tokenizer
        self.num_top = num_top  # top_logprobs
        self.make_tool_parser = make_tool_parser  # None: the output is text, no tool calls
        self.tool_parsers: dict[int, ToolParser] = {}  # a streamed choice's, by index

    def opening_choices(self, num_choices: int) -> list[ChatChunkChoice]:
        # As OpenAI: each choice's first chunk gives the role and no text yet.
        return [ChatChunkChoice(index, DeltaMessage(role="assistant", content="")) for index in range(num_choices)]

    def chunk_choice(self, index: int, delta: ChoiceDelta) -> ChatChunkChoice | None:
        if self.make_tool_parser is not None:
            return self._tool_chunk_choice(index, delta)
        text = delta.text
        if not text and delta.logprobs is None and not delta.finished:
            return None  # only part of a character so far
        message = DeltaMessage(content=text if text or not delta.finished else None)
        return ChatChunkChoice(index, message, self._logprobs(delta), delta.finish_reason, delta.stop_reason)

    def _tool_chunk_choice(self, index: int, delta: ChoiceDelta) -> ChatChunkChoice | None:
        parser = self.tool_parsers.get(index)
        if parser is None:
            parser = self.tool_parsers[index] = self.make_tool_parser()
        parsed = parser.feed(delta.text)
        if delta.finished:
            end = parser.finish()
            parsed = ParsedDelta(parsed.content + end.content, parsed.calls + end.calls)
        if not parsed.content and not parsed.calls and delta.logprobs is None and not delta.finished:
            return None  # held back: maybe the start of a call
        message = DeltaMessage(content=parsed.content or None,
                               tool_calls=[_delta_tool_call(call) for call in parsed.calls] or None)
        return ChatChunkChoice(index, message, self._logprobs(delta),
                               _finish_reason(delta.finish_reason, parser.num_calls), delta.stop_reason)

    def final_choice(self, index: int, total: ChoiceDelta) -> ChatChoice:
        if self.make_tool_parser is None:
            message = AssistantMessage(total.text)
            finish_reason = total.finish_reason
        else:
            parsed = self.make_tool_parser().parse(total.text)
            calls = [ToolCall(id=call.id, function=FunctionCall(call.name, call.arguments)) for call in parsed.calls]
            message = AssistantMessage(parsed.content, tool_calls=calls)
            finish_reason = _finish_reason(total.finish_reason, len(calls))
        return ChatChoice(index, message, self._logprobs(total), finish_reason, total.stop_reason)

    def chunk(self, created: int, choices: list[ChatChunkChoice], usage: Usage | None) -> msgspec.Struct:
        return ChatCompletionChunk(self.request_id, created, self.model, choices, usage)

    def response(self, created: int, choices: list[ChatChoice], usage: Usage) -> msgspec.Struct:
        return ChatCompletion(self.request_id, created, self.model, choices, usage)

    def _logprobs(self, delta: ChoiceDelta) -> ChatLogprobs | None:
        return chat_logprobs(self.tokenizer, delta.logprobs, self.num_top) if delta.logprobs else None


def _finish_reason(finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI's "tool_calls" for an output that ended on its own after making calls."""
    return "tool_calls" if finish_reason == "stop" and num_calls else finish_reason


def _delta_tool_call(call: ToolCallDelta) -> DeltaToolCall:
    if call.id is None:
        return DeltaToolCall(call.index, DeltaFunctionCall(arguments=call.arguments))
    return DeltaToolCall(call.index, DeltaFunctionCall(call.name, call.arguments), id=call.id, type="function")
