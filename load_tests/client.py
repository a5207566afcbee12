"""One request of a load run, sent with aiohttp and timed as vLLM's benchmark_serving times it.

Kinds: `stream` (SSE, timed per chunk), `unary` (one JSON response), `disconnect` (SSE,
dropped after the first text, which must abort the request on the server) and `invalid` (a
bad body, which must get a 4xx in OpenAI's error shape). Each result says whether the server
behaved as that kind expects; anything else is an unexpected error.

Times: TTFT runs from just before the POST to the first chunk carrying generated text (not
chat's empty role chunk, which a server may send before any token exists); ITL is the gap
between successive text chunks; latency ends at `[DONE]`. Token counts come from the
`usage` the server reports (`stream_options.include_usage`).
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from load_tests.datasets import Prompt

KINDS = ("stream", "unary", "disconnect", "invalid")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# Bodies the server must refuse, cycled through by `invalid` requests: (JSON value or raw bytes).
INVALID_BODIES: list[Any] = [
    b'{"prompt": ',  # malformed JSON
    {"max_tokens": 0},
    {"temperature": 5},
    {"n": 0},
    {"model": "no-such-model"},
]


def check_loopback(base_url: str) -> str:
    """The URL without a trailing slash, if it names this machine; a load generator must not
    be pointed at someone else's server."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        raise ValueError(f"expected http://HOST:PORT, got {base_url!r}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name other than localhost: never resolved, never trusted
        if not loopback:
            raise ValueError(f"refusing non-loopback target {host!r}: load runs only against this machine "
                             "(localhost, 127.0.0.0/8, ::1)")
    return base_url.rstrip("/")


@dataclass
class RequestResult:
    kind: str
    ok: bool = False  # the server did what this kind expects
    status: int = 0
    error: str = ""
    ttft: float | None = None  # seconds; streams only
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # perf_counter at send


@dataclass(frozen=True)
class RequestSpec:
    kind: str
    prompt: Prompt
    index: int  # position in the run; picks the body of an invalid request


def build_body(spec: RequestSpec, endpoint: str, model: str, ignore_eos: bool, temperature: float) -> dict:
    prompt = spec.prompt
    body: dict[str, Any] = {"model": model, "max_tokens": prompt.output_len, "temperature": temperature,
                            "ignore_eos": ignore_eos}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.token_ids if prompt.token_ids is not None else prompt.text
    if spec.kind != "unary":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def send(session: aiohttp.ClientSession, base_url: str, endpoint: str, spec: RequestSpec, model: str,
               ignore_eos: bool, temperature: float, headers: dict[str, str]) -> RequestResult:
    result = RequestResult(spec.kind)
    body: Any = build_body(spec, endpoint, model, ignore_eos, temperature)
    if spec.kind == "invalid":
        bad = INVALID_BODIES[spec.index % len(INVALID_BODIES)]
        body = bad if isinstance(bad, bytes) else {**body, **bad}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    result.start = time.perf_counter()
    try:
        async with session.post(base_url + ENDPOINTS[endpoint], data=data,
                                headers={"Content-Type": "application/json", **headers}) as response:
            result.status = response.status
            if spec.kind == "invalid":
                await _check_refusal(response, result)
            elif response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
            elif spec.kind == "unary":
                await _read_unary(response, result)
            else:
                await _read_stream(response, result, endpoint, stop_early=spec.kind == "disconnect")
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: a chunk that is not JSON
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - result.start
    if result.ok and ignore_eos and spec.kind in ("stream", "unary") and result.output_tokens != spec.prompt.output_len:
        result.ok = False
        result.error = f"ignore_eos: expected {spec.prompt.output_len} output tokens, got {result.output_tokens}"
    return result


async def _check_refusal(response: aiohttp.ClientResponse, result: RequestResult) -> None:
    try:
        error = (await response.json(content_type=None))["error"]
        result.ok = 400 <= response.status < 500 and bool(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    if not result.ok:
        result.error = f"a bad request got HTTP {response.status}, not a 4xx in OpenAI's error shape"


async def _read_unary(response: aiohttp.ClientResponse, result: RequestResult) -> None:
    body = await response.json()
    usage = body.get("usage") or {}
    result.prompt_tokens = usage.get("prompt_tokens", 0)
    result.output_tokens = usage.get("completion_tokens", 0)
    result.ok = bool(body.get("choices"))
    if not result.ok:
        result.error = "a response without choices"


async def _read_stream(response: aiohttp.ClientResponse, result: RequestResult, endpoint: str,
                       stop_early: bool) -> None:
    last = result.start
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            # Tokens without text are possible: byte tokens of a character the output ended
            # before completing stay unsent. Such a request has no TTFT, and is left out of it.
            result.ok = True
            return
        chunk = json.loads(payload)
        if "error" in chunk:
            result.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
            return
        if usage := chunk.get("usage"):
            result.prompt_tokens = usage.get("prompt_tokens", 0)
            result.output_tokens = usage.get("completion_tokens", 0)
        if not any(_text(choice, endpoint) for choice in chunk.get("choices") or ()):
            continue
        now = time.perf_counter()
        if result.ttft is None:
            result.ttft = now - result.start
            if stop_early:
                result.ok = True
                response.close()  # drop the connection: the server must abort the request
                return
        else:
            result.itl.append(now - last)
        last = now
    result.error = "the stream ended before [DONE]"


def _text(choice: dict, endpoint: str) -> str:
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""
