"""The aiohttp application: its middlewares (OpenAI-shaped errors, the API key), its routes,
and the handlers of the small endpoints. Chat and text completions are served from
`serving_chat` and `serving_completion`."""

from __future__ import annotations

import functools
import hmac
import logging
import time
from typing import Awaitable, Callable

from aiohttp import HttpVersion11, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST

from frontend.errors import APIError, engine_dead, invalid_param, shutting_down
from frontend.openai_protocol import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest
from frontend.prompts import chat_prompt, check_in_vocabulary, text_prompt
from frontend.request_body import decode_body
from frontend.responses import json_response
from frontend.server_state import ServerState
from frontend.version import octavo_version
from frontend.serving_chat import create_chat_completion
from frontend.serving_completion import create_completion
from metrics.prometheus import PrometheusStatLogger

logger = logging.getLogger("octavo")

MAX_BODY_BYTES = 16 << 20  # larger bodies get a 413 before they are parsed
# Served without the API key: probes and scrapers, which need no secret and reveal none.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})

STATE = web.AppKey("state", ServerState)
METRICS = web.AppKey("metrics", PrometheusStatLogger)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(error: APIError) -> web.Response:
    return web.Response(status=error.status, body=error.body(), content_type="application/json",
                        headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:
        return _error_response(e)
    except web.HTTPException as e:  # aiohttp's own: unknown route (404), 405, body too large (413)
        if e.status < 400:
            raise
        message = e.text if e.status == 413 else f"{e.reason}: {request.method} {request.path}"
        return _error_response(APIError(e.status, message))
    except Exception as e:
        logger.exception("error serving %s %s", request.method, request.path)
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    api_key = request.app[STATE].api_key
    if api_key is not None and request.path not in OPEN_PATHS:
        # Compared as the bytes sent: aiohttp hands over bytes that are not UTF-8 as lone
        # surrogates, which a plain str.encode() refuses. Several Authorization headers are
        # refused: proxies differ on which one counts.
        given = [value.encode("utf-8", "surrogateescape") for value in request.headers.getall(hdrs.AUTHORIZATION, [])]
        if len(given) != 1 or not hmac.compare_digest(given[0], f"Bearer {api_key}".encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return await handler(request)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining.is_set():
        return _error_response(shutting_down("draining the requests in progress"))
    if state.client.dead_reason is not None:
        return _error_response(engine_dead(state.client.dead_reason))
    return web.Response()


async def version(request: web.Request) -> web.Response:
    return json_response({"version": octavo_version()})


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    created = int(time.time())
    return json_response(ModelList([ModelCard(name, created, state.ready.model_path, state.ready.max_model_len)
                                    for name in state.model_names]))


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await decode_body(request, TokenizeRequest)
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise invalid_param("prompt", "give exactly one of prompt and messages")
    if body.messages is not None:
        tokens = await chat_prompt(state, body.messages, body.add_generation_prompt)
    else:
        tokens = await text_prompt(state, body.prompt or "", body.add_special_tokens)
    return json_response({"count": len(tokens), "max_model_len": state.ready.max_model_len, "tokens": tokens})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await decode_body(request, DetokenizeRequest)
    state.check_model(body.model)
    check_in_vocabulary(body.tokens, state.ready.vocab_size, "tokens", "token ids")
    return json_response({"prompt": await state.tokenizer.decode(body.tokens)})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def kv_cache_stats(request: web.Request) -> web.Response:
    """The engine's KV block pool (free / total blocks, usage): for operators and tests."""
    return json_response(await request.app[STATE].client.call_utility("get_kv_cache_stats"))


async def reset_prefix_cache(request: web.Request) -> web.Response:
    return json_response({"success": await request.app[STATE].client.call_utility("reset_prefix_cache")})


async def request_stats(request: web.Request) -> web.Response:
    """Requests the frontend holds: admitted against the overload bound, and engine requests
    awaiting outputs. Both 0 once the server is idle; load tests check this for leaks."""
    state = request.app[STATE]
    return json_response({"admitted": state.admission.admitted, "limit": state.admission.limit,
                          "engine_requests": len(state.client.processor.requests)})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await create_chat_completion(request.app[STATE], request)


async def completions(request: web.Request) -> web.StreamResponse:
    return await create_completion(request.app[STATE], request)


def build_app(state: ServerState, prometheus: PrometheusStatLogger) -> web.Application:
    # Bodies are decompressed by decode_body, where a bad one gets a 400 in OpenAI's shape.
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=MAX_BODY_BYTES,
                          handler_args={"auto_decompress": False})
    app[STATE] = state
    app[METRICS] = prometheus
    routes = [("GET", "/health", health), ("GET", "/metrics", metrics), ("GET", "/version", version),
              ("GET", "/v1/models", list_models), ("POST", "/v1/chat/completions", chat_completions),
              ("POST", "/v1/completions", completions), ("POST", "/tokenize", tokenize),
              ("POST", "/detokenize", detokenize), ("GET", "/v1/internal/kv_cache", kv_cache_stats),
              ("POST", "/v1/internal/reset_prefix_cache", reset_prefix_cache),
              ("GET", "/v1/internal/requests", request_stats)]
    # Every request, a wrong method or an unknown path included, goes through our routes: only
    # they carry our Expect handler (aiohttp's own answers a non-UTF-8 Expect with a 500).
    for method, path, handler in routes:
        app.router.add_route(method, path, handler, expect_handler=expect_continue)
        app.router.add_route("*", path, functools.partial(method_not_allowed, method), expect_handler=expect_continue)
    app.router.add_route("*", "/{path:.*}", not_found, expect_handler=expect_continue)
    return app


async def method_not_allowed(allowed: str, request: web.Request) -> web.Response:
    raise APIError(405, f"Method Not Allowed: {request.method} {request.path} (allowed: {allowed})",
                   headers={"Allow": allowed})


async def not_found(request: web.Request) -> web.Response:
    raise APIError(404, f"Not Found: {request.method} {request.path}")


async def expect_continue(request: web.Request) -> None:
    """Answers `Expect: 100-continue` as aiohttp's default does, and lets the request go on
    to the middlewares (the API key) and its handler whatever else it expects: RFC 9110 allows
    that, where aiohttp's default answers 417 in plain text, or 500 for a value not UTF-8."""
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue" and request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # not part of the response's size in the access log
