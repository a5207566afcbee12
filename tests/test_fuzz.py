"""Fuzzing the HTTP API with hypothesis: every endpoint and field, one real server.

Each case is one raw HTTP request: a valid body with a few fields perturbed (wrong types,
64-bit edges, NaN / Infinity tokens, lone surrogates, invalid UTF-8, deep nesting, unknown
fields, nulls) or no JSON at all, odd headers (Content-Type, Content-Encoding, Authorization
with non-ASCII bytes), unknown paths and methods. Whatever comes in, the answer must be
deliberate:

- never a 5xx, but 503 with Retry-After when overloaded;
- every 4xx an OpenAI error body; 401 without the API key (but on /health, /metrics,
  /version); a refusal for a non-JSON Content-Type, a request-supplied chat template, and
  more choices than the admission bound;
- every 2xx in its endpoint's shape, every stream ending with `data: [DONE]`;

and afterwards the server must be whole: both processes alive, the SDK served, every KV
block free, nothing admitted, the engine never restarted.

Cases are derandomized: CI sends the same ~2,100 requests each run. Generations stay cheap
(max_tokens <= 2, n <= 3, and most bodies are invalid). A failure prints the request as
`Case(...)`; `send(server, Case(...))` replays it.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from hypothesis import HealthCheck, given, note, reject, settings
from hypothesis import strategies as st

from test_server import API_KEY, CHAT, MODEL, ServerProcess, engine_is_gone, request

MAX_NUM_SEQS = 4
MAX_WAITING_REQUESTS = 16
ADMISSION_LIMIT = MAX_NUM_SEQS + MAX_WAITING_REQUESTS  # choices one request may ask for
VOCAB_SIZE = 49152  # SmolLM2's; ids beyond it are among the perturbations anyway
# The server ends any request after SERVER_REQUEST_TIMEOUT_S (a body without max_tokens may
# generate up to max_model_len tokens, minutes on a loaded CPU); no answer within
# REQUEST_TIMEOUT_S is a hang.
SERVER_REQUEST_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 60.0
OPEN_PATHS = {"/health", "/metrics", "/version"}  # served without the API key

FUZZ = settings(derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Case:
    """One raw HTTP request; its repr is the reproducer."""

    method: str
    path: str
    headers: tuple[tuple[str, bytes], ...]
    body: bytes | None


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


def send(server: ServerProcess, case: Case) -> Response:
    # http.client's low-level calls send header values as given bytes, non-ASCII included.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        for name, value in case.headers:
            conn.putheader(name, value)
        if case.body is not None:
            conn.putheader("Content-Length", str(len(case.body)))
        conn.endheaders(case.body)
        response = conn.getresponse()
        return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


# ---------------------------------------------------------------- JSON, including invalid JSON


@dataclass(frozen=True)
class Raw:
    """Bytes spliced verbatim into a JSON body: what `json.dumps` cannot write."""

    data: bytes


DELETE = object()  # as a field's new value: remove the field


def dump(value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"{" + b",".join(dump(k) + b":" + dump(v) for k, v in value.items()) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(map(dump, value)) + b"]"
    if isinstance(value, str):  # lone surrogates go out as (invalid) UTF-8 bytes
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()  # ints of any size; NaN and Infinity as bare tokens


def mostly(usual: st.SearchStrategy, rare: st.SearchStrategy, one_in: int = 8) -> st.SearchStrategy:
    """`rare` about once in `one_in` draws, else `usual`."""
    return st.integers(1, one_in).flatmap(lambda i: rare if i == 1 else usual)


def deep(depth: int) -> Raw:
    return Raw(b"[" * depth + b"]" * depth)


EDGE_INTS = [-1, 0, 1, 3, 21, 128, 129, 513, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, -(2**64), 10**100]
EDGE_FLOATS = [0.5, -0.0, 2.5, 1e308, 5e-324, float("nan"), float("inf"), float("-inf")]
ODD_STRINGS = ["", " ", "\x00", "\ud800", "\udfff\ud800", "\ufeff", "\u202e", "é", "😀" * 50, "<|im_start|>",
               "<|endoftext|>", "{{ raise_exception('x') }}", "{% for i in range(999999999) %}x{% endfor %}",
               "a" * 10_000]
RAW_TOKENS = [Raw(b"NaN"), Raw(b"-Infinity"), Raw(b"1e999"), Raw(b"-0"), Raw(b"1.0"), Raw(b'"\\ud800"'),
              Raw(b'"\\u0000"'), Raw(b'"\xff\xfe"'), Raw(b'"\xc3\x28"'), Raw(b"01"), Raw(b"tru"), deep(100),
              deep(1_000), deep(100_000), Raw(b'{"a":' * 1_000 + b"1" + b"}" * 1_000)]

TEXT = mostly(st.text(max_size=40), st.sampled_from(ODD_STRINGS))
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(EDGE_INTS) | st.floats() | st.sampled_from(EDGE_FLOATS)
    | TEXT | st.sampled_from(RAW_TOKENS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def maybe_junk(valid: st.SearchStrategy) -> st.SearchStrategy:
    """For nested fields: perturbed now and then, so that most bodies still get past them."""
    return mostly(valid, JUNK, one_in=16)


def perturbed(fields: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Valid bodies with up to three fields replaced by junk, deleted, or added under another
    name; or, one in eight, a body that is not even a JSON object."""
    names = st.sampled_from(sorted({**fields, **optional}))
    mutation = st.tuples(mostly(names, st.text(max_size=12), one_in=6), mostly(JUNK, st.just(DELETE), one_in=6))

    def apply(body: dict, mutations: list[tuple[str, Any]]) -> bytes:
        for name, value in mutations:
            if value is DELETE:
                body.pop(name, None)
            else:
                body[name] = value
        return dump(body)

    valid = st.builds(apply, st.fixed_dictionaries(fields, optional=optional), st.lists(mutation, max_size=3))
    return mostly(valid, not_json(valid))


def not_json(valid: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def truncated(draw) -> bytes:
        body = draw(valid)
        return body[:draw(st.integers(0, max(len(body) - 1, 0)))]

    return st.one_of(
        truncated(), st.binary(max_size=64),
        valid.map(lambda body: b"\xef\xbb\xbf" + body),  # a byte-order mark
        valid.map(lambda body: body + body),  # two documents
        st.sampled_from([b"", b" ", b"null", b"[]", b"[1,2]", b'"text"', b"1", b"{", b"{}}", b'{"a": 1,}',
                         b"{'a': 1}", b'{"a": 1, "a": [2]}', b"\x00", b'{"\xff": 1}', deep(1_000).data,
                         b'{"messages":' * 10_000]))


# ---------------------------------------------------------------- endpoint bodies

TOKEN_ID = st.integers(0, VOCAB_SIZE - 1)
CONTENT = TEXT | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)
ROLE = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
MESSAGES = st.lists(st.fixed_dictionaries({"role": maybe_junk(ROLE), "content": maybe_junk(CONTENT)},
                                          optional={"name": maybe_junk(TEXT)}), min_size=1, max_size=3)
# Keyword names apply_chat_template or the template itself also use.
TEMPLATE_KWARGS = ["enable_thinking", "chat_template", "tools", "documents", "add_generation_prompt", "tokenize",
                   "conversation", "messages", "continue_final_message", "return_dict", "bos_token", "tokenizer_kwargs"]
MAX_TOKENS = st.integers(1, 2)

SAMPLING = {  # the fields chat and text completions share, valid
    "model": st.just(MODEL),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 100),
    "min_p": st.floats(0, 1),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "logit_bias": st.dictionaries(TOKEN_ID.map(str) | st.sampled_from(["-1", "1e3", "x", "", str(2**64)]),
                                  st.floats(-100, 100), max_size=3),
    "stop": TEXT | st.lists(TEXT, max_size=4),
    "stop_token_ids": st.lists(TOKEN_ID, max_size=3),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 2),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "user": TEXT,
    "request_timeout": st.floats(1, 60),
}
CHAT_BODIES = perturbed({"messages": MESSAGES, "max_tokens": MAX_TOKENS}, {
    **SAMPLING,
    "max_completion_tokens": MAX_TOKENS,
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "add_generation_prompt": st.booleans(),
    "continue_final_message": st.booleans(),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(TEMPLATE_KWARGS), JUNK, max_size=2),
})
PROMPT = mostly(
    TEXT | st.lists(TEXT, min_size=1, max_size=3) | st.lists(TOKEN_ID, min_size=1, max_size=8)
    | st.lists(st.lists(TOKEN_ID, min_size=1, max_size=8), min_size=1, max_size=3),
    st.sampled_from([[], [[]], ["a", 1], [[1], "a"], [1.5], [-1], [VOCAB_SIZE], [2**63], [[2**64]], [0] * 600,
                     [[0]] * (ADMISSION_LIMIT + 1), ["a"] * 10_000 + [""]]))
COMPLETION_BODIES = perturbed({"prompt": PROMPT, "max_tokens": MAX_TOKENS}, {
    **SAMPLING,
    "echo": st.booleans(),
    "logprobs": st.integers(0, 20),
    "best_of": st.integers(1, 3),
    "suffix": TEXT,
})
TOKENIZE_BODIES = perturbed({}, {"model": st.just(MODEL), "prompt": TEXT, "messages": MESSAGES,
                                 "add_special_tokens": st.booleans(), "add_generation_prompt": st.booleans()})
HUGE_TOKEN_LIST = Raw(b"[1" + b",1" * 99_999 + b"]")  # as Raw: dumping 100,000 ints per draw is slow
DETOKENIZE_BODIES = perturbed({"tokens": mostly(st.lists(TOKEN_ID, max_size=20), st.just(HUGE_TOKEN_LIST))},
                              {"model": st.just(MODEL)})


# ---------------------------------------------------------------- headers

GOOD_AUTH = f"Bearer {API_KEY}".encode()
# The scheme is case-insensitive by RFC 9110, and servers differ on extra whitespace: either answer is fine.
ODD_AUTH = [GOOD_AUTH.replace(b"Bearer", b"bearer"), GOOD_AUTH.replace(b"Bearer", b"BEARER"),
            GOOD_AUTH.replace(b" ", b"  "), GOOD_AUTH.replace(b" ", b"\t")]
BAD_AUTH = [b"", b"Bearer", b"Bearer wrong", b"Basic dGVzdC1rZXk=", API_KEY.encode(), GOOD_AUTH + b"2",
            GOOD_AUTH[:-1], b"Bearer \xff", b"Bearer t\xe9st-key", "Bearer tést-key".encode(), GOOD_AUTH + b"\xff",
            b"\xc3\x28"]
JSON_TYPES = [b"application/json", b"application/json; charset=utf-8", b"Application/JSON"]
NON_JSON_TYPES = [b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x",
                  b"application/xml", b"text/html; charset=utf-8", b"application/octet-stream"]
ODD_TYPES = [b"", b"application/json; charset=latin-1", b"application/vnd.api+json", b"*/*", b"application/json\xff"]
ENCODINGS = [(b"gzip", True), (b"gzip", False), (b"deflate", False), (b"br", False), (b"zstd", False),
             (b"identity", False), (b"x-unknown", False), (b"gzip, gzip", True)]  # (value, compress the body)
# Header values may hold any byte but controls (obs-text included); controls are bad HTTP,
# which aiohttp's parser answers before the application sees anything.
HEADER_VALUE = st.binary(max_size=24).map(lambda v: bytes(b for b in v if b >= 0x20 and b != 0x7F))


@dataclass(frozen=True)
class Headers:
    authorization: tuple[bytes, ...]  # each sent as its own header
    content_type: bytes | None
    encoding: tuple[bytes, bool] | None
    extra: tuple[tuple[str, bytes], ...]


HEADERS = st.builds(
    Headers,
    mostly(st.just((GOOD_AUTH,)), st.one_of(
        st.just(()), st.sampled_from(BAD_AUTH + ODD_AUTH).map(lambda v: (v,)), HEADER_VALUE.map(lambda v: (v,)),
        st.lists(st.sampled_from([GOOD_AUTH, *BAD_AUTH]), min_size=2, max_size=3).map(tuple))),
    mostly(st.sampled_from(JSON_TYPES), st.sampled_from([None, *NON_JSON_TYPES, *ODD_TYPES])),
    mostly(st.none(), st.sampled_from(ENCODINGS), one_in=12),
    mostly(st.just(()), st.lists(st.tuples(
        st.sampled_from(["Accept", "Expect", "Connection", "User-Agent"])
        | st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(lambda n: f"X-{n}"),
        mostly(HEADER_VALUE, st.sampled_from([b"text/event-stream", b"100-continue", b"close", b"\xff" * 4000])),
    ), max_size=3).map(tuple), one_in=6))


def make_case(method: str, path: str, headers: Headers, body: bytes | None) -> Case:
    sent = [("Authorization", value) for value in headers.authorization]
    if headers.content_type is not None:
        sent.append(("Content-Type", headers.content_type))
    if headers.encoding is not None and body is not None:
        value, compress = headers.encoding
        sent.append(("Content-Encoding", value))
        body = gzip.compress(gzip.compress(body) if value == b"gzip, gzip" else body) if compress else body
    return Case(method, path, (*sent, *headers.extra), body)


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
JSON_ROUTES = {"/v1/chat/completions": CHAT_BODIES, "/v1/completions": COMPLETION_BODIES,
               "/tokenize": TOKENIZE_BODIES, "/detokenize": DETOKENIZE_BODIES}
ROUTES = {("POST", path) for path in JSON_ROUTES} | {("POST", "/v1/internal/reset_prefix_cache")} | {
    ("GET", path) for path in ["/health", "/metrics", "/version", "/v1/models", "/v1/internal/kv_cache",
                               "/v1/internal/requests"]}
NEAR_MISSES = ["/", "/v1", "/v1/", "/health/", "//health", "/v1//models", "/V1/MODELS", "/v1/chat/completions/",
               "/v1/chat", "/v1/engines", "/v1/models/" + MODEL, "/v1/internal", "/v1/internal/kv_cache/..",
               "/v1/%2e%2e/health", "/v1/models%00", "/v1/models?%zz", "/tokenize?prompt=hi", "/%ff", "/.env",
               "/v1/completions?stream=true&n=2", "/metrics?name[]=octavo:x", "/" + "a" * 4_000]
PATHS = st.sampled_from(sorted({path for _, path in ROUTES})) | st.sampled_from(NEAR_MISSES) | st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789/._~-%?=&", max_size=30).map(lambda p: "/" + p)


def json_route_cases(path: str) -> st.SearchStrategy:
    return st.builds(make_case, mostly(st.just("POST"), st.sampled_from(METHODS), one_in=20), st.just(path),
                     HEADERS, JSON_ROUTES[path])


OTHER_CASES = st.builds(make_case, mostly(st.just("GET"), st.sampled_from(METHODS), one_in=3),
                        mostly(st.sampled_from(sorted(path for method, path in ROUTES if method == "GET")), PATHS,
                               one_in=3),
                        HEADERS, mostly(st.none(), st.binary(max_size=32) | not_json(DETOKENIZE_BODIES), one_in=4))


# ---------------------------------------------------------------- what every answer must be


def check(server: ServerProcess, case: Case) -> None:
    note(f"request: {case!r}")
    log_offset = os.path.getsize(server.log.name)
    try:
        response = send(server, case)
    except OSError as e:  # timeouts included
        raise AssertionError(f"no answer ({e!r}): a hang or a crash; server log:\n{log_since(server, log_offset)}")
    note(f"answer: {response.status} {response.headers} {response.body[:2000]!r}")
    error = error_of(response)
    if response.status == 503 and error.get("code") == "engine_dead":
        # An earlier case killed the engine (the final test fails on its restart): this one
        # is not to blame, and must not become the example hypothesis shrinks to.
        wait_for_health(server)
        reject()
    assert response.status < 500 or (response.status == 503 and error.get("code") == "overloaded"
                                      and "retry-after" in response.headers), \
        f"server error; server log:\n{log_since(server, log_offset)}"
    # A request that is not valid HTTP/1.1 (a repeated singleton header, say) is refused by
    # aiohttp's parser before any route runs, as uvicorn refuses it under vLLM: a plain-text 400.
    # So is an Expect header aiohttp cannot meet on a path with no route for the method (417).
    if response.status in (400, 417) and response.headers.get("content-type", "").startswith("text/plain"):
        assert any(word in response.body for word in (b"header", b"HTTP", b"Expect")), "a plain-text refusal"
        return
    if response.status >= 400 and case.method != "HEAD":
        assert set(error) == {"message", "type", "param", "code"}, "not an OpenAI error body"
        assert isinstance(error["message"], str) and isinstance(error["type"], str), "not an OpenAI error body"
    check_refusals(case, response.status)
    if response.status == 200 and case.method != "HEAD":
        check_success(urlsplit(case.path).path, response)


def error_of(response: Response) -> dict:
    try:
        error = json.loads(response.body)["error"]
    except (ValueError, TypeError, KeyError):
        return {}
    return error if isinstance(error, dict) else {}


def check_refusals(case: Case, status: int) -> None:
    route = urlsplit(case.path).path
    known = (case.method, route) in ROUTES or (case.method == "HEAD" and ("GET", route) in ROUTES)
    auth = [value.strip(b" \t") for name, value in case.headers if name == "Authorization"]
    if auth == [GOOD_AUTH]:
        assert status != 401, "the right API key was refused"
    elif known and route not in OPEN_PATHS and not any(value == GOOD_AUTH or value in ODD_AUTH for value in auth):
        assert status == 401, "served without the API key"
    if auth != [GOOD_AUTH] or route not in JSON_ROUTES or case.method != "POST":
        return
    content_type = next((value for name, value in case.headers if name == "Content-Type"), None)
    if content_type in NON_JSON_TYPES:
        assert status == 415, "a body that is not JSON by its Content-Type was not refused with 415"
    if status != 200:
        return
    try:
        body = json.loads(case.body)
    except (ValueError, RecursionError):
        return  # a compressed body: not worth decoding to look for the rest
    if isinstance(body, dict):
        kwargs = body.get("chat_template_kwargs")
        assert not (isinstance(kwargs, dict) and kwargs.get("chat_template") is not None), \
            "ran a request-supplied chat template"
        assert num_choices(body) <= ADMISSION_LIMIT, "admitted more choices than the admission bound at once"


def num_choices(body: dict) -> int:
    prompt = body.get("prompt")
    num_prompts = len(prompt) if isinstance(prompt, list) and not all(isinstance(p, int) for p in prompt) else 1
    n = body.get("n", 1)
    return num_prompts * (n if isinstance(n, int) else 1)


def check_success(route: str, response: Response) -> None:
    if route == "/metrics":
        assert b"octavo:" in response.body
        return
    if route == "/health":
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert route in ("/v1/chat/completions", "/v1/completions")
        events = [e for e in response.body.split(b"\n\n") if e]
        assert events and events[-1] == b"data: [DONE]", "the stream did not end with [DONE]"
        for event in events[:-1]:
            assert event.startswith(b"data: ")
            data = json.loads(event[6:])
            assert data.get("error", {}).get("type") != "server_error", "a server error mid-stream"
        return
    body = json.loads(response.body)
    expected = {"/v1/chat/completions": "choices", "/v1/completions": "choices", "/tokenize": "tokens",
                "/detokenize": "prompt", "/v1/models": "data", "/version": "version",
                "/v1/internal/kv_cache": "num_free_blocks", "/v1/internal/requests": "admitted",
                "/v1/internal/reset_prefix_cache": "success"}[route]
    assert expected in body
    if expected == "choices":
        assert body["choices"] and all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
    if expected == "tokens":
        assert body["count"] == len(body["tokens"])


def log_since(server: ServerProcess, offset: int) -> str:
    with open(server.log.name, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    return "\n".join(line for line in lines if "aiohttp.access" not in line)


def wait_for_health(server: ServerProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while request(server, "GET", "/health")[0] != 200:
        assert time.monotonic() < deadline, f"the engine did not come back:\n{server.log_text()[-5000:]}"
        time.sleep(0.5)


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    # Restarts are allowed without limit so that shrinking a case that kills the engine can
    # replay it; the last test fails on any restart.
    proc = ServerProcess("--max-model-len", "512", "--api-key", API_KEY, "--max-num-seqs", str(MAX_NUM_SEQS),
                         "--max-waiting-requests", str(MAX_WAITING_REQUESTS), "--max-engine-restarts", "1000",
                         "--request-timeout", str(SERVER_REQUEST_TIMEOUT_S))
    yield proc
    assert proc.stop() == 0, proc.log_text()
    proc.remove_log()


@settings(FUZZ, max_examples=700)
@given(case=json_route_cases("/v1/chat/completions"))
def test_chat_completions(server, case):
    check(server, case)


@settings(FUZZ, max_examples=700)
@given(case=json_route_cases("/v1/completions"))
def test_completions(server, case):
    check(server, case)


@settings(FUZZ, max_examples=250)
@given(case=json_route_cases("/tokenize"))
def test_tokenize(server, case):
    check(server, case)


@settings(FUZZ, max_examples=150)
@given(case=json_route_cases("/detokenize"))
def test_detokenize(server, case):
    check(server, case)


@settings(FUZZ, max_examples=300)
@given(case=OTHER_CASES)
def test_other_routes_paths_and_methods(server, case):
    check(server, case)


def test_the_server_is_whole_after_the_fuzzing(server):
    # The engine that started first must still be serving: a restart means a case killed it.
    assert server.proc.poll() is None and not engine_is_gone(server.engine_pid), server.log_text()[-20000:]
    assert request(server, "GET", "/health")[0] == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert response.choices[0].finish_reason in ("stop", "length") and response.usage.completion_tokens >= 1
    auth = {"Authorization": f"Bearer {API_KEY}"}
    deadline = time.monotonic() + 15
    while (kv := request(server, "GET", "/v1/internal/kv_cache", headers=auth)[1])["num_free_blocks"] != \
            kv["num_total_blocks"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv["num_free_blocks"] == kv["num_total_blocks"], kv
    held = request(server, "GET", "/v1/internal/requests", headers=auth)[1]
    assert held["admitted"] == 0 and held["engine_requests"] == 0, held
