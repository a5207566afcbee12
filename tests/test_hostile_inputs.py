"""Hostile inputs from a security review, each sent as the review sent it to one real server:
numbers past what the engine's tensors hold, JSON nested too deeply, undecodable headers and
bodies, bodies that are not JSON, paths open without the API key, one request wider than the
admission bound, megabyte prompts, a request-supplied chat template, clients that leave early.

Each must get a deliberate 4xx in OpenAI's shape, fast, and leave the server whole: the same
engine process serving, nothing held. Timings are asserted only loosely (speed is measured in
benchmarks); what they guard against took tens of seconds.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import AsyncGenerator, Iterator

import msgspec
import pytest
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.test_utils import make_mocked_request

from engine_core.protocol import INT32_MAX, INT64_MAX, INT64_MIN, EngineCoreRequest, SamplingParams
from frontend.openai_protocol import MAX_PROMPTS
from frontend.responses import stream_sse
from test_server import API_KEY, CHAT, MODEL, ServerProcess, engine_is_gone, request

MAX_MODEL_LEN = 512
ADMISSION_LIMIT = 128 + 1024  # the default --max-num-seqs + --max-waiting-requests
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BIG_TEXT = "hello world, this is a test. " * 350_000  # ~10 MB: tokenizing it took 30 s here


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY)
    yield proc
    assert proc.stop() == 0, proc.log_text()
    proc.remove_log()


def send(server: ServerProcess, method: str, path: str, headers: list[tuple[str, bytes]],
         body: bytes | None = None) -> tuple[int, bytes]:
    """Raw HTTP, header values as given bytes (non-ASCII included): (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def openai_error(status: int, body: bytes | dict, expected_status: int) -> dict:
    """The error of an OpenAI-shaped error response."""
    assert status == expected_status, body
    got = json.loads(body) if isinstance(body, bytes) else body
    assert set(got) == {"error"} and set(got["error"]) == {"message", "type", "param", "code"}, got
    assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]
    return got["error"]


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 1, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 1, **fields}


# ---------------------------------------------------------------- 1. numbers out of range

OUT_OF_RANGE = [
    # id, path, body, param, the value the message must quote
    ("review: top_k 2^63", "/v1/completions", {"prompt": "hi", "max_tokens": 1, "top_k": 2**63}, "top_k", 2**63),
    ("top_k 2^63 on chat", "/v1/chat/completions", chat(top_k=2**63), "top_k", 2**63),
    ("top_k past int32", "/v1/completions", completion(top_k=INT32_MAX + 1), "top_k", INT32_MAX + 1),
    ("seed 2^64", "/v1/completions", completion(seed=2**64), "seed", 2**64),
    ("seed below int64", "/v1/chat/completions", chat(seed=INT64_MIN - 1), "seed", INT64_MIN - 1),
    ("n 2^63", "/v1/chat/completions", chat(n=2**63), "n", 2**63),
    ("max_tokens 2^63", "/v1/completions", completion(max_tokens=2**63), "max_tokens", 2**63),
    ("max_completion_tokens past int32", "/v1/chat/completions", chat(max_completion_tokens=INT32_MAX + 1),
     "max_completion_tokens", INT32_MAX + 1),
    ("min_tokens 2^63", "/v1/completions", completion(min_tokens=2**63), "min_tokens", 2**63),
    ("min_tokens negative", "/v1/completions", completion(min_tokens=-1), "min_tokens", -1),
    ("logprobs 2^63", "/v1/completions", completion(logprobs=2**63), "logprobs", 2**63),
    ("top_logprobs 21", "/v1/chat/completions", chat(logprobs=True, top_logprobs=21), "top_logprobs", 21),
    ("best_of 2^63", "/v1/completions", completion(best_of=2**63), "best_of", 2**63),
    ("stop_token_ids item 2^63", "/v1/completions", completion(stop_token_ids=[1, 2**63]), "stop_token_ids[1]",
     2**63),
    ("logit_bias key 2^63", "/v1/chat/completions", chat(logit_bias={str(2**63): 1}), "logit_bias", None),
    ("logit_bias value 1e300", "/v1/chat/completions", chat(logit_bias={"5": 1e300}), "logit_bias", None),
    ("prompt token id 2^63", "/v1/completions", completion(prompt=[1, 2**63]), "prompt[1]", 2**63),
    ("nested prompt token id -1", "/v1/completions", completion(prompt=[[1], [2, -1]]), "prompt[1][1]", -1),
    ("detokenize id 2^63", "/detokenize", {"tokens": [2**63]}, "tokens[0]", 2**63),
    ("temperature 1e300", "/v1/chat/completions", chat(temperature=1e300), "temperature", 1e300),
    ("top_p 1.5", "/v1/completions", completion(top_p=1.5), "top_p", 1.5),
    ("min_p -1", "/v1/completions", completion(min_p=-1), "min_p", -1),
    ("presence_penalty 3", "/v1/chat/completions", chat(presence_penalty=3), "presence_penalty", 3),
    ("frequency_penalty -1e300", "/v1/completions", completion(frequency_penalty=-1e300), "frequency_penalty",
     -1e300),
    ("repetition_penalty -1", "/v1/completions", completion(repetition_penalty=-1), "repetition_penalty", -1),
]


@pytest.mark.parametrize(("path", "body", "param", "value"), [case[1:] for case in OUT_OF_RANGE],
                         ids=[case[0] for case in OUT_OF_RANGE])
def test_numbers_out_of_range_are_400s_naming_the_parameter_and_value(server, path, body, param, value):
    error = openai_error(*request(server, "POST", path, body, AUTH), 400)
    assert error["param"] == param
    if value is not None:
        assert f"got {value!r}" in error["message"], error


def test_the_engine_decoder_holds_the_same_bounds_and_validate_catches_the_rest():
    decoder = msgspec.msgpack.Decoder(EngineCoreRequest)  # as the engine's input thread decodes
    encode = msgspec.msgpack.encode
    # Past a field's bounds the message cannot even be decoded: no such value reaches a tensor.
    for params in (SamplingParams(top_k=2**63), SamplingParams(seed=2**63), SamplingParams(stop_token_ids=[2**31]),
                   SamplingParams(logprobs=21), SamplingParams(logit_bias={2**40: 1.0})):
        with pytest.raises(msgspec.ValidationError):
            decoder.decode(encode(EngineCoreRequest("r", [1], params)))
    # Within them but wrong for this model or for another field: decoded, then refused by
    # validate, which finishes the request with an error (the engine drops what it cannot decode).
    for params, message in ((SamplingParams(stop_token_ids=[10**7]), "stop_token_ids"),
                            (SamplingParams(max_tokens=2, min_tokens=3), "min_tokens"),
                            (SamplingParams(temperature=float("inf")), "temperature")):
        decoded = decoder.decode(encode(EngineCoreRequest("r", [1], params)))
        with pytest.raises(ValueError, match=message):
            decoded.sampling_params.validate(vocab_size=49152)
    # Built in Python, as `LLM` users do, validate checks every bound itself.
    for params, message in ((SamplingParams(top_k=2**63), f"top_k must be in [-1, {INT32_MAX}]"),
                            (SamplingParams(seed=INT64_MAX + 1), "seed must be in"),
                            (SamplingParams(max_tokens=2**40), f"max_tokens must be <= {INT32_MAX}"),
                            (SamplingParams(stop_token_ids=[2**40]), "stop_token_ids")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            params.validate()


def test_n_choices_at_the_64_bit_seed_edge_complete(server):
    # Choice i samples with seed + i: past int64 it would not decode in the engine, and hang.
    status, body = request(server, "POST", "/v1/completions", completion(n=2, seed=INT64_MAX), AUTH, timeout=60)
    assert status == 200 and len(body["choices"]) == 2, body


# ---------------------------------------------------------------- 2. unintended 500s


@pytest.mark.parametrize(("body", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "Expected `object`, got `array`"),
    (b'{"messages":' * 10_000, "Expected `array`, got `object` - at `$.messages`"),
    # Where any JSON is welcome, the decoder recurses until Python's recursion limit stops it.
    (json.dumps(chat()).encode()[:-1] + b', "chat_template_kwargs": {"x": ' + b"[" * 2_000 + b"]" * 2_000 + b"}}",
     "too deeply"),
], ids=["array", "objects", "in chat_template_kwargs"])
def test_json_nested_1000s_deep_is_400(server, body, message):
    error = openai_error(*request(server, "POST", "/v1/chat/completions", body, AUTH), 400)
    assert message in error["message"]


@pytest.mark.parametrize("value", [b"Bearer \xe9", b"Bearer \xff\xfe", b"Bearer t\xc3\xa9st-key", b"\xc3\x28"],
                         ids=["latin-1", "invalid utf-8", "utf-8", "invalid utf-8 alone"])
def test_authorization_with_non_ascii_bytes_is_401(server, value):
    status, body = send(server, "GET", "/v1/models", [("Authorization", value)])
    assert openai_error(status, body, 401)["code"] == "invalid_api_key"


ENCODED = [
    # Content-Encoding, body, status, what the message says
    (b"gzip", b'{"prompt": "hi"}', 400, "not the gzip data its Content-Encoding says"),
    (b"deflate", b"{}", 400, "not the deflate data its Content-Encoding says"),
    (b"gzip", gzip.compress(b'{"prompt": "hi"}')[:-4], 400, "does not end where the body ends"),
    (b"gzip", gzip.compress(b" " * (17 << 20)), 413, "larger than 16777216 bytes once decompressed"),  # a bomb
    (b"br", b"{}", 415, "must be one of identity, gzip, x-gzip, deflate; got 'br'"),
    (b"zstd", b"{}", 415, "got 'zstd'"),
    (b"gzip, gzip", gzip.compress(gzip.compress(b"{}")), 415, "got 'gzip, gzip'"),
]


@pytest.mark.parametrize(("encoding", "body", "status", "message"), ENCODED,
                         ids=["not gzip", "not deflate", "truncated", "bomb", "br", "zstd", "twice"])
def test_a_body_that_is_not_encoded_as_it_claims_is_a_4xx(server, encoding, body, status, message):
    headers = [("Authorization", AUTH["Authorization"].encode()), ("Content-Type", b"application/json"),
               ("Content-Encoding", encoding)]
    assert message in openai_error(*send(server, "POST", "/tokenize", headers, body), status)["message"]


@pytest.mark.parametrize("encoding", [b"gzip", b"GZIP", b"x-gzip", b"deflate", b"identity"])
def test_bodies_encoded_as_they_claim_are_served(server, encoding):
    body = b'{"prompt": "hi"}'
    encoded = {b"identity": body, b"deflate": zlib.compress(body)}.get(encoding.lower(), gzip.compress(body))
    headers = [("Authorization", AUTH["Authorization"].encode()), ("Content-Type", b"application/json"),
               ("Content-Encoding", encoding)]
    status, got = send(server, "POST", "/tokenize", headers, encoded)
    assert status == 200 and json.loads(got)["count"] >= 1, got


def test_an_unknown_expect_header_is_ignored_and_100_continue_works(server):
    for value in (b"\x80", b"something-else"):  # aiohttp's default answered the first with a 500
        headers = [("Content-Type", b"application/json"), ("Expect", value)]
        assert send(server, "POST", "/tokenize", headers, b'{"prompt": "hi"}')[0] == 401
        status, body = send(server, "POST", "/tokenize", [("Authorization", AUTH["Authorization"].encode()), *headers],
                            b'{"prompt": "hi"}')
        assert status == 200, body
    body = b'{"prompt": "hi"}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
                     + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK")


# ---------------------------------------------------------------- 3. Content-Type


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/x-www-form-urlencoded",
                                          b"multipart/form-data; boundary=x", None])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_post_bodies_that_are_not_declared_json_get_415(server, path, content_type):
    headers = [("Authorization", AUTH["Authorization"].encode())]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    status, body = send(server, "POST", path, headers, json.dumps(chat()).encode())
    error = openai_error(status, body, 415)
    assert error["code"] == "unsupported_media_type"
    assert (repr(content_type.decode()) if content_type else "was none") in error["message"]


def test_json_with_a_charset_is_json(server):
    headers = [("Authorization", AUTH["Authorization"].encode()), ("Content-Type", b"application/json; charset=utf-8")]
    status, body = send(server, "POST", "/tokenize", headers, b'{"prompt": "hi"}')
    assert status == 200, body


# ---------------------------------------------------------------- 4. auth


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/internal/kv_cache"),
    ("GET", "/v1/internal/requests"), ("POST", "/v1/internal/reset_prefix_cache"), ("GET", "/v1/models"),
    ("POST", "/v1/completions"), ("GET", "/health/"), ("GET", "/nowhere"),
])
def test_everything_but_the_probes_requires_the_api_key(server, method, path):
    body = b'{"prompt": "hi", "tokens": [1]}' if method == "POST" else None
    status, got = send(server, method, path, [("Content-Type", b"application/json")], body)
    assert openai_error(status, got, 401)["code"] == "invalid_api_key"
    # Two keys, even both right, are refused: which one counts would be up to each proxy.
    status, got = send(server, method, path, [("Authorization", AUTH["Authorization"].encode())] * 2, body)
    assert status == 401, got


@pytest.mark.parametrize("path", ["/health", "/metrics", "/version"])
def test_probes_stay_open(server, path):
    assert send(server, "GET", path, [])[0] == 200


# ---------------------------------------------------------------- 5. admission


def test_one_request_wider_than_the_admission_bound_is_400(server):
    # The review's: 20 prompts x n=128 put 2,560 engine requests past a bound of 1,152.
    error = openai_error(*request(server, "POST", "/v1/completions", completion(prompt=["hi"] * 20, n=128), AUTH),
                         400)
    assert error["param"] == "n"
    assert f"asks for 2560 completions (20 prompts x n = 128), more than the {ADMISSION_LIMIT}" in error["message"]
    error = openai_error(*request(server, "POST", "/v1/completions", completion(prompt=["hi"] * (ADMISSION_LIMIT + 1)),
                                  AUTH), 400)
    assert error["param"] == "prompt" and f"asks for {ADMISSION_LIMIT + 1} completions" in error["message"]
    error = openai_error(*request(server, "POST", "/v1/completions", completion(prompt=[[1]] * (MAX_PROMPTS + 1)),
                                  AUTH), 400)
    assert error["param"] == "prompt" and f"at most {MAX_PROMPTS} prompts, got {MAX_PROMPTS + 1}" in error["message"]
    held = request(server, "GET", "/v1/internal/requests", headers=AUTH)[1]
    assert held["admitted"] == 0 and held["engine_requests"] == 0, held


# ---------------------------------------------------------------- 6. megabyte prompts


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", completion(prompt=BIG_TEXT), "prompt"),
    ("/v1/completions", completion(prompt=["hi", BIG_TEXT]), "prompt"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": BIG_TEXT}]), "messages"),
    ("/tokenize", {"prompt": BIG_TEXT}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": BIG_TEXT}]}, "messages"),
], ids=["completion", "completion list", "chat", "tokenize", "tokenize chat"])
def test_a_10_mb_prompt_is_refused_at_once_and_health_answers_meanwhile(server, path, body, param):
    payload = json.dumps(body).encode()
    reply: dict[str, tuple[int, dict]] = {}
    sender = threading.Thread(target=lambda: reply.update(big=request(server, "POST", path, payload, AUTH)))
    started = time.monotonic()
    sender.start()
    health_s = []
    while sender.is_alive():
        probe = time.monotonic()
        assert request(server, "GET", "/health", timeout=30)[0] == 200
        health_s.append(time.monotonic() - probe)
    sender.join()
    took = time.monotonic() - started
    error = openai_error(*reply["big"], 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    # Generous bounds, for a loaded 2-core machine: tokenizing the text took ~30 s, and stalled
    # /health for as long when it ran on the event loop.
    assert took < 10, took
    assert max(health_s, default=0) < 2, health_s


# ---------------------------------------------------------------- 7. request-supplied chat template

SLOW_TEMPLATE = "{% for i in range(30000) %}{% for j in range(30000) %}{% endfor %}{% endfor %}"


def test_a_chat_template_from_the_request_is_refused(server):
    started = time.monotonic()
    error = openai_error(*request(server, "POST", "/v1/chat/completions",
                                  chat(chat_template_kwargs={"chat_template": SLOW_TEMPLATE}), AUTH), 400)
    assert time.monotonic() - started < 10  # it froze the server for a minute
    assert error["param"] == "chat_template_kwargs" and "--trust-request-chat-template" in error["message"]
    # Other template variables are still passed on.
    status, body = request(server, "POST", "/v1/chat/completions", chat(chat_template_kwargs={"enable_thinking": False}),
                           AUTH)
    assert status == 200, body


def test_chat_template_kwargs_that_clash_with_the_renderer_are_400(server):
    for kwargs in ({"tokenize": True}, {"conversation": []}, {"documents": 5}):
        error = openai_error(*request(server, "POST", "/v1/chat/completions", chat(chat_template_kwargs=kwargs), AUTH),
                             400)
        assert error["param"] == "messages" and "chat template cannot render" in error["message"], error


# ---------------------------------------------------------------- 8. clients that leave early


class _Gone:
    """An SSE source that records whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    async def events(self) -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: {}\n\n"
        finally:
            self.closed = True


@pytest.mark.parametrize("error", [ClientConnectionResetError("Cannot write to closing transport"),
                                   ConnectionResetError("reset by peer")], ids=["aiohttp", "builtin"])
@pytest.mark.parametrize("fails", ["prepare", "write"])
def test_a_client_gone_before_or_during_the_stream_is_no_error(monkeypatch, caplog, error, fails):
    async def fail(*args, **kwargs):
        raise error

    async def ok(*args, **kwargs):
        return None

    monkeypatch.setattr(web.StreamResponse, "prepare", fail if fails == "prepare" else ok)
    monkeypatch.setattr(web.StreamResponse, "write", fail)
    source = _Gone()

    async def run() -> web.StreamResponse:
        events = source.events()
        if fails == "prepare":
            await events.__anext__()  # started: closing it must run its finally
        return await stream_sse(make_mocked_request("POST", "/v1/chat/completions"), events)

    with caplog.at_level(logging.DEBUG, logger="frontend.responses"):
        response = asyncio.run(run())
    assert isinstance(response, web.StreamResponse) and source.closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_clients_that_hang_up_at_once_leave_no_error_in_the_log(server):
    offset = len(server.log_text())
    body = json.dumps(chat(max_tokens=4, stream=True)).encode()
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 30
    while (held := request(server, "GET", "/v1/internal/requests", headers=AUTH)[1])["admitted"] and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert held["admitted"] == 0 and held["engine_requests"] == 0, held
    log = server.log_text()[offset:]
    assert "ERROR" not in log and "Traceback" not in log and '" 500 ' not in log, log


# ---------------------------------------------------------------- afterwards


def test_the_server_is_whole_after_all_that(server):
    assert request(server, "GET", "/health")[0] == 200
    assert not engine_is_gone(server.engine_pid)
    assert server.log_text().count("started the engine core process") == 1, "the engine was restarted"
    status, body = request(server, "POST", "/v1/chat/completions", chat(max_tokens=4), AUTH)
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body
    status, body = request(server, "POST", "/v1/completions", completion(max_tokens=4), AUTH)
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length"), body
    log = server.log_text()
    assert "Traceback" not in log, log[-20000:]
