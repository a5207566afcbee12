"""Overload: with room for 2 running and 2 waiting requests, a burst of 12 gets 4 admitted and
8 refused at once with 503 + Retry-After in OpenAI's error shape; the admitted ones complete,
and the server then serves normally with nothing left held."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from test_server import MODEL, ServerProcess, request

MAX_NUM_SEQS = 2
MAX_WAITING = 2
LIMIT = MAX_NUM_SEQS + MAX_WAITING
BURST = 12
MAX_TOKENS = 16  # long enough that no admitted request ends before the burst is answered


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--max-model-len", "256", "--max-num-seqs", str(MAX_NUM_SEQS),
                         "--max-waiting-requests", str(MAX_WAITING))
    yield proc
    assert proc.stop() == 0, proc.log_text()
    proc.remove_log()


@dataclass
class Reply:
    status: int
    seconds: float  # until the whole response was read
    headers: dict[str, str]
    body: bytes


async def post(session: aiohttp.ClientSession, url: str, stream: bool) -> Reply:
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "stream": stream}
    start = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as response:
        data = await response.read()
        return Reply(response.status, time.perf_counter() - start, dict(response.headers), data)


def test_a_burst_beyond_the_bound_gets_503_at_once_and_the_admitted_complete(server):
    async def burst() -> list[Reply]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(post(session, server.url, stream=i % 2 == 0) for i in range(BURST)))

    replies = asyncio.run(burst())
    admitted = [r for r in replies if r.status == 200]
    refused = [r for r in replies if r.status == 503]
    assert len(admitted) == LIMIT and len(refused) == BURST - LIMIT, [r.status for r in replies]
    for reply in refused:
        assert int(reply.headers["Retry-After"]) >= 1
        error = json.loads(reply.body)["error"]
        assert error["code"] == "overloaded" and error["type"] == "server_error" and error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    # Refusals do not wait behind the work: every one is answered before any admitted request ends.
    assert max(r.seconds for r in refused) < min(r.seconds for r in admitted)
    for reply in admitted:
        if reply.body.startswith(b"data: "):
            assert reply.body.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"length"' in reply.body
        else:
            assert b'"completion_tokens":%d' % MAX_TOKENS in reply.body

    # Afterwards: nothing held, and normal service.
    state = request(server, "GET", "/v1/internal/requests")[1]
    assert state == {"admitted": 0, "limit": LIMIT, "engine_requests": 0}
    kv = request(server, "GET", "/v1/internal/kv_cache")[1]
    assert kv["num_free_blocks"] == kv["num_total_blocks"]
    status, body = request(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_a_request_wider_than_the_bound_is_refused_with_400(server):
    # No retry could ever admit it: a 503 would have clients retry forever.
    status, body = request(server, "POST", "/v1/completions",
                           {"prompt": "Hi", "max_tokens": 2, "n": LIMIT + 1, "ignore_eos": True})
    assert status == 400 and body["error"]["param"] == "n", body
    assert f"asks for {LIMIT + 1} completions" in body["error"]["message"]
    assert f"more than the {LIMIT} this server serves at once" in body["error"]["message"]
