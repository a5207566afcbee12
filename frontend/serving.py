"""What chat and text completions share: the server's state, fan-out into engine requests,
context-length checks, SSE framing and logprob formatting."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import hdrs, web

from engine_core.protocol import INT64_MIN, EngineCoreRequest, EngineReady, Logprobs, SamplingParams
from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from frontend.engine_client import EngineClient
from frontend.engine_supervisor import EngineSupervisor
from frontend.errors import (
    APIError,
    from_decode_error,
    invalid_param,
    overloaded,
    request_timed_out,
    shutting_down,
    undecodable_body,
    unsupported_content_encoding,
    unsupported_media_type,
)
from frontend.openai_protocol import ChatLogprobs, ChatMessage, CompletionLogprobs, TokenLogprob, TopLogprob, Usage
from frontend.output_processor import ChoiceDelta, RequestOutputCollector, RequestState
from frontend.tokenizer import ModelTokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
_json = msgspec.json.Encoder()


class AdmissionLimit:
    """Bounds the engine requests admitted but not finished (choices of HTTP requests still
    being served). Past the bound a new request gets 503 at once: overload then costs clients
    a retry, instead of a queue, its memory and everyone's latency growing without bound.
    Requests already admitted are never touched."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted = 0

    def check_request_size(self, num_prompts: int, n: int) -> None:
        """Refuse (400) a request that alone needs more engine requests than the bound: no
        retry could ever admit it. Handlers call this before any tokenization."""
        if num_prompts * n > self.limit:
            prompts = f"{num_prompts} prompt{'s' if num_prompts > 1 else ''}"
            raise invalid_param("prompt" if num_prompts > self.limit else "n",
                                f"This request asks for {num_prompts * n} completions ({prompts} x n = {n}), more "
                                f"than the {self.limit} this server serves at once. Send fewer prompts or a smaller "
                                "n per request.")

    def acquire(self, num_requests: int) -> None:
        if self.admitted + num_requests > self.limit:
            raise overloaded(self.limit)
        self.admitted += num_requests

    def release(self, num_requests: int) -> None:
        self.admitted -= num_requests


@dataclass(frozen=True)
class ServerState:
    engine: EngineSupervisor
    tokenizer: ModelTokenizer
    ready: EngineReady
    model_names: list[str]  # the first is the name responses carry by default
    api_key: str | None
    admission: AdmissionLimit
    request_timeout: float | None  # seconds; a request's own `request_timeout` overrides it
    draining: asyncio.Event = field(default_factory=asyncio.Event)  # set at SIGTERM: admit nothing new
    trust_request_chat_template: bool = False  # run a chat template sent in chat_template_kwargs

    @property
    def client(self) -> EngineClient:
        """The engine now serving (after a restart, the new one)."""
        return self.engine.client

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.model_names[0]
        if model not in self.model_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model


# The Content-Encodings a request body may have, with their zlib window bits (None: as is).
# aiohttp's own decoding is off (build_app): its errors bypass the middlewares, in plain text.
BODY_ENCODINGS: dict[str, int | None] = {"identity": None, "gzip": 16 + zlib.MAX_WBITS,
                                         "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def decode_body(request: web.Request, type_: type[T]) -> T:
    # JSON bodies only: a web page can make a browser POST a text/plain, form or multipart
    # body to a server on localhost without a CORS preflight, but never an application/json one.
    if request.content_type != "application/json":
        raise unsupported_media_type(request.headers.get(hdrs.CONTENT_TYPE))
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in BODY_ENCODINGS:
        raise unsupported_content_encoding(encoding, list(BODY_ENCODINGS))
    body = await request.read()  # raises 413 beyond the app's client_max_size
    wbits = BODY_ENCODINGS[encoding]
    if wbits is not None:
        body = _decompress(body, wbits, encoding, request.client_max_size)
    try:
        return msgspec.json.decode(body, type=type_)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
        raise from_decode_error(e, body) from None


def _decompress(body: bytes, wbits: int, encoding: str, max_size: int) -> bytes:
    # Bounded: a few kilobytes of a compressed body can inflate to gigabytes.
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, max_size + 1)
    except zlib.error as e:
        raise undecodable_body(encoding, str(e)) from None
    if len(data) > max_size:
        raise APIError(413, f"The request body is larger than {max_size} bytes once decompressed.")
    if not decompressor.eof or decompressor.unused_data:
        raise undecodable_body(encoding, "it does not end where the body ends")
    return data


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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


async def chat_prompt(state: ServerState, messages: list[ChatMessage], add_generation_prompt: bool,
                      continue_final_message: bool = False,
                      template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The conversation's token ids: rendered by the chat template and tokenized, off the loop."""
    text = await state.tokenizer.render_chat(messages, add_generation_prompt, continue_final_message,
                                             template_kwargs)
    check_text_fits(state.tokenizer, state.ready.max_model_len, text, "messages")
    # The template writes the special tokens (BOS included) itself.
    return await state.tokenizer.encode(text, add_special_tokens=False)


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    # As vLLM: with a seed, choice i samples with seed + i, so n > 1 gives n different
    # samples and the whole response stays reproducible. The sum wraps around within 64 bits,
    # the seed's bounds on the wire.
    if params.seed is None or index == 0:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + index - INT64_MIN) % 2**64 + INT64_MIN)


class Generation:
    """The engine requests behind one HTTP request, one per choice, sharing one collector.
    Admitted (or refused with 503) on creation; its handler must `close()` it. Past its
    timeout (the request's own, else the server's) it raises a 408 and its handler's
    `close()` aborts it, freeing its KV cache."""

    def __init__(self, state: ServerState, request_id: str, prompts: list[list[int]],
                 params: list[SamplingParams], stop: list[str], include_stop_str_in_output: bool,
                 skip_special_tokens: bool, timeout: float | None = None) -> None:
        if state.draining.is_set():
            raise shutting_down("it finishes the requests in progress and admits no new ones")
        self.request_id = request_id
        self.client = state.client
        self.timeout = state.request_timeout if timeout is None else timeout
        self.deadline = None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout
        self.collector = RequestOutputCollector()
        self.unfinished: dict[int, str] = {}  # choice index -> engine request id
        self.admission = state.admission
        self.admission.acquire(len(prompts))
        self.num_admitted = len(prompts)
        try:
            arrival = time.time()
            for index, (prompt, choice_params) in enumerate(zip(prompts, params)):
                child_id = f"{request_id}-{index}"
                detokenizer = IncrementalDetokenizer(state.tokenizer.fast, prompt, skip_special_tokens)
                matcher = StopStringMatcher(stop, include_stop_str_in_output) if stop else None
                request_state = RequestState(child_id, index, self.collector, detokenizer, matcher,
                                             include_stop_str_in_output)
                self.unfinished[index] = child_id
                self.client.add_request(EngineCoreRequest(child_id, prompt, choice_params, arrival),
                                        request_state)
        except BaseException:  # the engine died mid-way: the handler never gets to close()
            self.close()
            raise

    @property
    def done(self) -> bool:
        return not self.unfinished

    async def next(self) -> dict[int, ChoiceDelta]:
        if self.deadline is None:
            deltas = await self.collector.get()
        else:
            try:
                deltas = await asyncio.wait_for(self.collector.get(),
                                                self.deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                raise request_timed_out(self.timeout) from None
        for index, delta in deltas.items():
            if delta.finished:
                self.unfinished.pop(index, None)
        return deltas

    async def collect(self) -> dict[int, ChoiceDelta]:
        """Everything, for a non-streaming response; raises the first choice's error."""
        total: dict[int, ChoiceDelta] = {}
        while not self.done:
            for index, delta in (await self.next()).items():
                if delta.error is not None:
                    raise delta.error
                if index in total:
                    total[index].merge(delta)
                else:
                    total[index] = delta
        return total

    def close(self) -> None:
        """Abort what is still running (the client went away or the response failed) and
        leave the admitted set; idempotent."""
        if self.unfinished:
            self.client.abort(list(self.unfinished.values()))
            self.unfinished.clear()
        self.admission.release(self.num_admitted)
        self.num_admitted = 0


def usage(num_prompt_tokens: int, num_output_tokens: int) -> Usage:
    return Usage(num_prompt_tokens, num_output_tokens, num_prompt_tokens + num_output_tokens)


def json_response(body: msgspec.Struct | dict | list) -> web.Response:
    return web.Response(body=_json.encode(body), content_type="application/json")


def sse_event(body: msgspec.Struct) -> bytes:
    return b"data: " + _json.encode(body) + b"\n\n"


async def stream_sse(request: web.Request, events: AsyncGenerator[bytes, None]) -> web.StreamResponse:
    """Send `events` as Server-Sent Events. Once the response has started an error cannot
    change its status, so it goes out as an error event before the closing [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await response.prepare(request)  # the client may be gone already
        try:
            async for data in events:
                await response.write(data)
            await response.write(SSE_DONE)
        except ConnectionResetError:
            raise  # to the handler below: no error event can reach a client that left
        except Exception as e:
            if not isinstance(e, APIError):
                logger.exception("error while streaming %s", request.path)
                e = APIError(500, f"internal error: {type(e).__name__}: {e}")
            await response.write(b"data: " + e.body() + b"\n\n" + SSE_DONE)
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one too
        # The client left: not a fault. The handler's Generation.close() aborts the engine
        # requests; aiohttp finishes the response quietly.
        logger.debug("the client of %s %s went away", request.method, request.path)
    finally:
        await events.aclose()
    return response


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
