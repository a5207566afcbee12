"""From a Generation to its HTTP response, for chat and text completions alike: one JSON body
once every choice has finished, or, when the request streams, an SSE chunk per choice delta as
it comes, then the usage.

The two endpoints differ only in the shape of their choices and of the bodies around them,
which each gives as a `ResponseShape`; waiting, errors, usage and closing are done here, once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from typing import Generic, TypeVar

import msgspec
from aiohttp import web

from frontend.generation import Generation
from frontend.openai_protocol import GenerationRequest, StreamOptions, Usage
from frontend.output_processor import ChoiceDelta
from frontend.responses import json_response, sse_event, stream_sse

ChunkChoice = TypeVar("ChunkChoice", bound=msgspec.Struct)  # a choice in a streamed chunk
Choice = TypeVar("Choice", bound=msgspec.Struct)  # a choice in the non-streaming response


class ResponseShape(ABC, Generic[ChunkChoice, Choice]):
    """What one endpoint's responses look like: its choices, and the bodies carrying them."""

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model

    def opening_choices(self, num_choices: int) -> list[ChunkChoice]:
        """Choices streamed before any token, each in a chunk of its own."""
        return []

    @abstractmethod
    def chunk_choice(self, index: int, delta: ChoiceDelta) -> ChunkChoice | None:
        """The streamed choice for a delta; None when there is nothing to show yet."""

    @abstractmethod
    def final_choice(self, index: int, total: ChoiceDelta) -> Choice:
        """A choice of the non-streaming response, from all of its deltas merged."""

    @abstractmethod
    def chunk(self, created: int, choices: list[ChunkChoice], usage: Usage | None) -> msgspec.Struct:
        """A streamed chunk: a choice's delta (with usage when continuous_usage_stats asks),
        or no choice and the final usage."""

    @abstractmethod
    def response(self, created: int, choices: list[Choice], usage: Usage) -> msgspec.Struct:
        """The non-streaming response."""


async def respond(request: web.Request, body: GenerationRequest, generation: Generation,
                  shape: ResponseShape[ChunkChoice, Choice], num_prompt_tokens: int) -> web.StreamResponse:
    """Answer `request` with `generation`'s choices, streamed or not as `body` asks. Takes the
    generation over: whatever way the response ends, its engine requests are closed (aborted,
    when the client went away or the response failed)."""
    try:
        if body.stream:
            events = _events(generation, shape, body.stream_options, num_prompt_tokens)
            return await stream_sse(request, events)
        return await _complete(generation, shape, num_prompt_tokens)
    finally:
        generation.close()


async def _complete(generation: Generation, shape: ResponseShape[ChunkChoice, Choice],
                    num_prompt_tokens: int) -> web.Response:
    total = await generation.collect()
    choices = [shape.final_choice(index, total[index]) for index in range(generation.num_choices)]
    num_output_tokens = sum(delta.num_output_tokens for delta in total.values())
    return json_response(shape.response(int(time.time()), choices, _usage(num_prompt_tokens, num_output_tokens)))


async def _events(generation: Generation, shape: ResponseShape[ChunkChoice, Choice],
                  options: StreamOptions | None, num_prompt_tokens: int) -> AsyncGenerator[bytes, None]:
    """The SSE events of a streamed response; a choice's error ends the stream (stream_sse sends it)."""
    include_usage = options is not None and options.include_usage
    continuous_usage = include_usage and options is not None and options.continuous_usage_stats
    created = int(time.time())
    num_output_tokens = [0] * generation.num_choices
    opening = shape.opening_choices(generation.num_choices)
    if opening:
        yield b"".join(sse_event(shape.chunk(created, [choice], None)) for choice in opening)
    while not generation.done:
        # What arrived together goes out in one write.
        events = []
        for index, delta in sorted((await generation.next()).items()):
            if delta.error is not None:
                raise delta.error
            num_output_tokens[index] = delta.num_output_tokens
            choice = shape.chunk_choice(index, delta)
            if choice is None:
                continue
            usage = _usage(num_prompt_tokens, sum(num_output_tokens)) if continuous_usage else None
            events.append(sse_event(shape.chunk(created, [choice], usage)))
        if events:
            yield b"".join(events)
    if include_usage:
        yield sse_event(shape.chunk(created, [], _usage(num_prompt_tokens, sum(num_output_tokens))))


def _usage(num_prompt_tokens: int, num_output_tokens: int) -> Usage:
    return Usage(num_prompt_tokens, num_output_tokens, num_prompt_tokens + num_output_tokens)
