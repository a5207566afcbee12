"""Response framing: a JSON body, or a stream of Server-Sent Events (`data: {json}` ... `data: [DONE]`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import msgspec
from aiohttp import web

from frontend.errors import APIError

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
_json = msgspec.json.Encoder()


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
        # The client left: not a fault. The caller's Generation.close() aborts the engine
        # requests; aiohttp finishes the response quietly.
        logger.debug("the client of %s %s went away", request.method, request.path)
    finally:
        await events.aclose()
    return response
