"""`octavo serve` end to end: a real server subprocess on the default model, driven by the real
OpenAI SDK (sync, async, streaming) and by raw HTTP for what the SDK cannot send.

One server serves the whole module (model loading dominates the cost); generations stay short.
`ServerProcess` is also used by the other test_server_* modules.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
import torch

from frontend.cli import parse_bytes
from load_tests.kill_rank import process_is_gone as engine_is_gone

API_KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 512
CHAT = [{"role": "user", "content": "Name three colors."}]


class ServerProcess:
    """`python -m frontend.cli serve` on a free port, with its log in a temporary file."""

    def __init__(self, *args: str, startup_timeout: float = 900.0, new_session: bool = False) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="octavo-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "frontend.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=new_session)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start in {startup_timeout} s:\n{self.log_text()}")
            try:
                if request(self, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)

    def log_text(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    @property
    def engine_pid(self) -> int:
        found = re.search(r"started the engine core process \(pid (\d+)\)", self.log_text())
        assert found, "the server did not log its engine's pid"
        return int(found.group(1))

    def remove_log(self) -> None:
        os.unlink(self.log.name)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def request(server: ServerProcess, method: str, path: str, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None, timeout: float = 120.0) -> tuple[int, Any]:
    """Raw HTTP: (status, parsed JSON body or raw bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--max-model-len", str(MAX_MODEL_LEN), "--api-key", API_KEY)
    yield proc
    engine_pid = proc.engine_pid
    assert proc.stop() == 0, proc.log_text()  # SIGTERM: an orderly shutdown
    assert engine_is_gone(engine_pid)
    proc.remove_log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient_factory(server):
    return lambda: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def kv_free_blocks(server: ServerProcess) -> int:
    status, body = request(server, "GET", "/v1/internal/kv_cache", headers=auth())
    assert status == 200, body
    return int(body["num_free_blocks"])


def wait_for_free_blocks(server: ServerProcess, target: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while (free := kv_free_blocks(server)) != target and time.monotonic() < deadline:
        time.sleep(0.1)
    return free


def stream_text(chunks) -> tuple[dict[int, str], dict[int, str | None], Any]:
    """Chat or completion stream chunks -> (text per choice, finish reason per choice, usage)."""
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            piece = choice.delta.content if hasattr(choice, "delta") else choice.text
            texts[choice.index] = texts.get(choice.index, "") + (piece or "")
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return texts, finish, usage


# ---------------------------------------------------------------- the command line

VLLM_FLAGS = ["--host", "--port", "--api-key", "--served-model-name", "--max-model-len", "--max-num-seqs",
              "--max-num-batched-tokens", "--block-size", "--dtype", "--gpu-memory-utilization",
              "--kv-cache-memory", "--enable-prefix-caching", "--no-enable-prefix-caching", "--seed",
              "--tensor-parallel-size"]


def octavo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frontend.cli", *args], capture_output=True, text=True, timeout=120)


def test_serve_help_explains_vllm_flags():
    result = octavo("serve", "--help")
    assert result.returncode == 0
    for flag in VLLM_FLAGS:
        assert flag in result.stdout


@pytest.mark.parametrize(("model", "message"), [
    ("/nonexistent", "no such file or directory"),
    (__file__, "a file must be a .gguf"),
    (os.path.dirname(__file__), "the directory has no config.json"),
])
def test_a_bad_model_path_is_one_line_before_anything_loads(model, message):
    result = octavo("serve", model)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(f"octavo serve: error: model {model!r}: {message}")
    assert "Traceback" not in result.stderr and "usage: octavo serve" in result.stderr


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--shutdown-timeout", "-1", "must be a finite number of seconds > 0, got -1"),
    ("--request-timeout", "nan", "must be a finite number of seconds > 0, got nan"),
    ("--request-timeout", "soon", "not a number of seconds: 'soon'"),
    ("--engine-restart-window", "inf", "must be a finite number of seconds > 0, got inf"),
    ("--max-engine-restarts", "-1", "must be >= 0, got -1"),
])
def test_lifetime_flags_refuse_hostile_values(flag, value, message):
    result = octavo("serve", flag, value)
    assert result.returncode == 2 and f"argument {flag}: {message}" in result.stderr, result.stderr


def test_ports_are_checked_before_anything_loads():
    result = octavo("serve", "--port", "99999")
    assert result.returncode == 2 and "argument --port: must be in [1, 65535], got 99999" in result.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = octavo("serve", "--host", "127.0.0.1", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and "cannot listen on 127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_flag():
    result = octavo("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"octavo {importlib.metadata.version('octavo')}"


def test_bad_engine_arguments_fail_before_loading_anything():
    result = octavo("serve", "--gpu-memory-utilization", "1.5")
    assert result.returncode == 2 and "gpu_memory_utilization must be (0, 1], got 1.5" in result.stderr
    result = octavo("serve", "--kv-cache-memory", "lots")
    assert result.returncode == 2 and "not a memory size" in result.stderr
    for size in ("0", "-2", "100000"):
        result = octavo("serve", "--tensor-parallel-size", size)
        assert result.returncode == 2 and f"tensor_parallel_size must be in [1, 64], got {size}" in result.stderr
    result = octavo("serve", "-tp", "two")
    assert result.returncode == 2 and "argument --tensor-parallel-size/-tp: invalid int value: 'two'" in result.stderr
    result = octavo("serve", "--distributed-executor-backend", "ray")
    assert result.returncode == 2 and "invalid choice: 'ray'" in result.stderr
    result = octavo("serve", "--distributed-executor-backend", "uni", "-tp", "2")
    assert result.returncode == 2 and "distributed_executor_backend must be 'mp' or None" in result.stderr
    for flag, size, bound in (("--max-num-seqs", "1000000000", 16384), ("--max-num-seqs", "0", 16384),
                              ("--max-num-batched-tokens", "99999999999", 1 << 20)):
        result = octavo("serve", flag, size)
        field = flag.removeprefix("--").replace("-", "_")
        assert result.returncode == 2 and f"{field} must be in [1, {bound}], got {size}" in result.stderr
    result = octavo("serve", "--load-format", "pt")
    assert result.returncode == 2 and "invalid choice: 'pt'" in result.stderr


def test_what_only_the_model_or_the_machine_can_refuse_is_one_line_exit_2(tmp_path):
    """Values checked once the engine knows its model and device: one line naming the value,
    exit code 2 as for a bad flag, and no traceback from either process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    result = octavo("serve", "--max-model-len", "100000", "--host", "127.0.0.1", "--port", port)
    assert result.returncode == 2, result.stderr
    assert "ERROR octavo: max_model_len must be <= 8192 (the model's maximum context), got 100000" in result.stderr
    assert "Traceback" not in result.stderr and "ERROR engine_core" not in result.stderr
    if not torch.cuda.is_available():
        result = octavo("serve", "--device", "cuda", "--host", "127.0.0.1", "--port", port)
        assert result.returncode == 2, result.stderr
        assert "ERROR octavo: device must be 'cpu' or 'auto' on a machine without CUDA, got 'cuda'" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("text", "size"), [("1073741824", 1 << 30), ("2GiB", 2 << 30), ("512MiB", 512 << 20),
                                            ("1.5GB", 1_500_000_000), ("64k", 64_000), ("3 gib", 3 << 30)])
def test_memory_sizes(text, size):
    assert parse_bytes(text) == size


# ---------------------------------------------------------------- basics


def test_health_version_models_tokenize(server, client):
    assert request(server, "GET", "/health")[0] == 200  # open even with --api-key
    status, body = request(server, "GET", "/version")
    assert status == 200 and body["version"]
    assert [m.id for m in client.models.list().data] == [MODEL]
    status, body = request(server, "POST", "/tokenize", {"prompt": "Hello world"}, auth())
    assert status == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    status, back = request(server, "POST", "/detokenize", {"tokens": body["tokens"]}, auth())
    assert status == 200 and back["prompt"] == "Hello world"


def test_chat_completion(server, client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    assert response.object == "chat.completion" and response.model == MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    _, tokens = request(server, "POST", "/tokenize", {"messages": CHAT}, auth())
    usage = response.usage
    assert usage.prompt_tokens == tokens["count"]
    assert 1 <= usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_equals_non_stream_under_greedy(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    texts, finish, usage = stream_text(chunks)
    assert texts == {0: full.choices[0].message.content}
    assert finish == {0: full.choices[0].finish_reason}
    assert usage.model_dump() == full.usage.model_dump()


def test_completion_stream_equals_non_stream_under_greedy(client):
    kwargs = dict(model=MODEL, prompt="The three primary colors are", max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs)
    assert full.object == "text_completion"
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, finish, usage = stream_text(chunks)
    assert texts == {0: full.choices[0].text}
    assert finish == {0: full.choices[0].finish_reason}
    assert usage.model_dump() == full.usage.model_dump()


def test_async_client_chat_completion_and_stream(client, aclient_factory):
    expected = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)

    async def run():
        aclient = aclient_factory()
        chat = aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
        completion = aclient.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)

        async def streamed():
            stream = await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                                           temperature=0, stream=True)
            return [chunk async for chunk in stream]

        results = await asyncio.gather(chat, completion, streamed())
        await aclient.close()
        return results

    chat, completion, chunks = asyncio.run(run())
    assert chat.choices[0].message.content == expected.choices[0].message.content
    assert completion.usage.completion_tokens >= 1
    assert stream_text(chunks)[0] == {0: expected.choices[0].message.content}


# ---------------------------------------------------------------- sampling features


def test_n2_fans_out(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=6, seed=3,
                                              extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert response.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", n=2, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts, finish, usage = stream_text(chunks)
    assert sorted(texts) == [0, 1] and finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == 12


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> list[str]:
        response = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=8, temperature=1.0,
                                                  seed=seed, extra_body={"ignore_eos": True})
        return [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_stop_strings_with_and_without_the_stop_in_the_output(client):
    kwargs = dict(model=MODEL, prompt="List the days of the week:", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3
    at = text.index(stop)
    for include in (False, True):
        expected = text[:at + len(stop)] if include else text[:at]
        extra = {"ignore_eos": True, "include_stop_str_in_output": include}
        full = client.completions.create(**{**kwargs, "extra_body": extra}, stop=[stop, "never seen"])
        assert full.choices[0].text == expected
        assert full.choices[0].finish_reason == "stop" and full.choices[0].stop_reason == stop
        chunks = list(client.completions.create(**{**kwargs, "extra_body": extra}, stop=stop, stream=True))
        texts, finish, _ = stream_text(chunks)
        assert texts == {0: expected} and finish == {0: "stop"}


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy: the argmax
        assert bytes(entry.bytes) == entry.token.encode()
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks for choice in c.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_completion_logprobs_with_echo(server, client):
    prompt = "The sky is"
    _, tokens = request(server, "POST", "/tokenize", {"prompt": prompt}, auth())
    num_prompt = tokens["count"]
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                         logprobs=2, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.text.startswith(prompt)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == num_prompt + 4
    assert "".join(logprobs.tokens[:num_prompt]) == prompt
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(0 < len(top) <= 3 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]


def test_completion_prompt_forms(server, client):
    prompt = "Once upon a time"
    _, tokens = request(server, "POST", "/tokenize", {"prompt": prompt}, auth())
    ids = tokens["tokens"]
    kwargs = dict(model=MODEL, max_tokens=6, temperature=0)
    expected = client.completions.create(prompt=prompt, **kwargs).choices[0].text
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == expected
    both = client.completions.create(prompt=[ids, ids], **kwargs)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [expected, expected]
    assert both.usage.prompt_tokens == 2 * len(ids)
    mixed = client.completions.create(prompt=[prompt, "Hello"], **kwargs)
    assert len(mixed.choices) == 2 and mixed.choices[0].text == expected


def test_message_content_as_text_parts(client):
    kwargs = dict(model=MODEL, max_tokens=8, temperature=0)
    parts = [{"type": "text", "text": "Name three"}, {"type": "text", "text": "colors."}]
    as_parts = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kwargs)
    as_string = client.chat.completions.create(messages=[{"role": "user", "content": "Name three\ncolors."}],
                                               **kwargs)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_max_completion_tokens_and_vllm_extras(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=5, temperature=0.7,
                                              seed=1, extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.05,
                                                                  "repetition_penalty": 1.1, "min_tokens": 4,
                                                                  "skip_special_tokens": False})
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


def test_stop_token_ids(server, client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", temperature=0)
    first = client.completions.create(max_tokens=1, logprobs=0, **kwargs).choices[0].logprobs.tokens[0]
    _, tokens = request(server, "POST", "/tokenize", {"prompt": first, "add_special_tokens": False}, auth())
    assert tokens["count"] == 1, "the first token's text must tokenize back to it"
    stop_id = tokens["tokens"][0]
    response = client.completions.create(max_tokens=8, extra_body={"stop_token_ids": [stop_id]}, **kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop_id
    assert response.usage.completion_tokens == 1 and choice.text == ""


# ---------------------------------------------------------------- errors

LONG_PROMPT = "hello " * (MAX_MODEL_LEN + 50)


def chat_body(**overrides: Any) -> dict:
    return {"model": MODEL, "messages": CHAT, "max_tokens": 4, **overrides}


def completion_body(**overrides: Any) -> dict:
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 4, **overrides}


BAD_REQUESTS = [
    # id, path, body, headers, status, param
    ("malformed json", "/v1/chat/completions", b'{"messages": [', None, 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", None, 400, None),
    ("non-utf8 body", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', None,
     400, None),
    ("messages wrong type", "/v1/chat/completions", chat_body(messages="hi"), None, 400, "messages"),
    ("max_tokens wrong type", "/v1/chat/completions", chat_body(max_tokens="ten"), None, 400, "max_tokens"),
    ("temperature wrong type", "/v1/chat/completions", chat_body(temperature="hot"), None, 400, "temperature"),
    ("unknown role", "/v1/chat/completions", chat_body(messages=[{"role": "wizard", "content": "x"}]), None, 400,
     "messages[0].role"),
    ("image part", "/v1/chat/completions",
     chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None,
     400, "messages[0].content[0].type"),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, None, 400, "messages"),
    ("empty messages", "/v1/chat/completions", chat_body(messages=[]), None, 400, "messages"),
    ("zero max_tokens", "/v1/chat/completions", chat_body(max_tokens=0), None, 400, "max_tokens"),
    ("negative max_tokens", "/v1/completions", completion_body(max_tokens=-3), None, 400, "max_tokens"),
    ("zero max_completion_tokens", "/v1/chat/completions", chat_body(max_completion_tokens=0), None, 400,
     "max_completion_tokens"),
    ("n above the limit", "/v1/chat/completions", chat_body(n=129), None, 400, "n"),
    ("n zero", "/v1/completions", completion_body(n=0), None, 400, "n"),
    ("temperature 5", "/v1/chat/completions", chat_body(temperature=5), None, 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", chat_body(top_p=0), None, 400, "top_p"),
    ("top_k -2", "/v1/completions", completion_body(top_k=-2), None, 400, "top_k"),
    ("repetition_penalty 0", "/v1/completions", completion_body(repetition_penalty=0), None, 400,
     "repetition_penalty"),
    ("top_logprobs 21", "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=21), None, 400,
     "top_logprobs"),
    ("completion logprobs 21", "/v1/completions", completion_body(logprobs=21), None, 400, "logprobs"),
    ("stop token id out of vocab", "/v1/completions", completion_body(stop_token_ids=[10**7]), None, 400,
     "stop_token_ids"),
    ("prompt token id out of vocab", "/v1/completions", completion_body(prompt=[1, 10**7]), None, 400, "prompt"),
    ("mixed prompt list", "/v1/completions", completion_body(prompt=["a", 1]), None, 400, "prompt"),
    ("empty prompt", "/v1/completions", completion_body(prompt=""), None, 400, "prompt"),
    ("stream_options without stream", "/v1/chat/completions", chat_body(stream_options={"include_usage": True}),
     None, 400, "stream_options"),
    ("prompt over max_model_len", "/v1/completions", completion_body(prompt=LONG_PROMPT), None, 400, "prompt"),
    ("chat over max_model_len", "/v1/chat/completions",
     chat_body(messages=[{"role": "user", "content": LONG_PROMPT}]), None, 400, "messages"),
    ("prompt plus max_tokens over max_model_len", "/v1/chat/completions", chat_body(max_tokens=MAX_MODEL_LEN),
     None, 400, "messages"),
    ("unknown model", "/v1/chat/completions", chat_body(model="gpt-17"), None, 404, "model"),
    ("unknown model on completions", "/v1/completions", completion_body(model="gpt-17"), None, 404, "model"),
    ("wrong api key", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer nope"}, 401, None),
    ("missing api key", "/v1/models", None, {"Authorization": ""}, 401, None),
    ("huge body", "/v1/chat/completions", b"x" * (17 << 20), None, 413, None),
    ("unknown route", "/v1/engines", None, None, 404, None),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "param"), [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request(server, path, body, headers, status, param):
    method = "GET" if body is None else "POST"
    got_status, got = request(server, method, path, body, {**auth(), **(headers or {})})
    assert got_status == status, got
    assert isinstance(got, dict) and set(got) == {"error"}, got
    error = got["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if error["code"] == "context_length_exceeded":
        assert str(MAX_MODEL_LEN) in error["message"]
        assert re.search(r"requested \d+ tokens", error["message"])


def test_context_length_message_states_the_numbers(server):
    _, tokens = request(server, "POST", "/tokenize", {"messages": CHAT}, auth())
    status, body = request(server, "POST", "/v1/chat/completions", chat_body(max_tokens=MAX_MODEL_LEN), auth())
    assert status == 400
    prompt = tokens["count"]
    assert (f"maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {prompt + MAX_MODEL_LEN} "
            f"tokens ({prompt} in the messages, {MAX_MODEL_LEN} in the completion)") in body["error"]["message"]


def test_the_sdk_sees_openai_errors(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature=5)
    assert raised.value.param == "temperature"


def test_a_normal_request_succeeds_after_the_bad_ones(client):
    response = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    assert response.usage.completion_tokens >= 1


# ---------------------------------------------------------------- load and disconnects

PROMPTS = ["Tell me a joke.", "What is 2 + 2?", "Write a haiku about autumn leaves falling.",
           "Explain in one sentence why the sky looks blue during the day."]


def test_32_concurrent_streams_each_get_their_text_alone(client, aclient_factory):
    kwargs = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    alone = [client.chat.completions.create(messages=[{"role": "user", "content": p}], **kwargs)
             .choices[0].message.content for p in PROMPTS]

    async def one(aclient: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await aclient.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=True,
                                                       **kwargs)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        aclient = aclient_factory()
        texts = await asyncio.gather(*(one(aclient, PROMPTS[i % len(PROMPTS)]) for i in range(32)))
        await aclient.close()
        return texts

    texts = asyncio.run(run())
    assert texts == [alone[i % len(PROMPTS)] for i in range(32)]


LONG_STREAM = chat_body(max_tokens=MAX_MODEL_LEN - 100, temperature=0, ignore_eos=True, stream=True)


def test_disconnect_mid_stream_aborts_the_request(server):
    idle = kv_free_blocks(server)

    async def read_a_little_then_leave() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.url}/v1/chat/completions", json=LONG_STREAM, headers=auth()) as resp:
                assert resp.status == 200
                seen = 0
                async for line in resp.content:
                    seen += line.startswith(b"data: ")
                    if seen >= 3:
                        break
                assert kv_free_blocks(server) < idle  # it is running
                resp.close()  # drop the connection mid-stream

    asyncio.run(read_a_little_then_leave())
    assert wait_for_free_blocks(server, idle) == idle


def test_a_request_past_its_timeout_ends_with_408_and_frees_its_kv_cache(server):
    idle = kv_free_blocks(server)
    started = time.monotonic()
    status, body = request(server, "POST", "/v1/chat/completions",
                           {**LONG_STREAM, "stream": False, "request_timeout": 0.5}, auth())
    assert status == 408 and body["error"]["code"] == "request_timeout", body
    assert "0.5 s" in body["error"]["message"]
    assert time.monotonic() - started < 10
    status, raw = request(server, "POST", "/v1/chat/completions", {**LONG_STREAM, "request_timeout": 0.5}, auth())
    assert status == 200
    assert raw.index(b'"code":"request_timeout"') < raw.index(b"data: [DONE]")
    assert wait_for_free_blocks(server, idle) == idle
    status, body = request(server, "POST", "/v1/chat/completions", {**LONG_STREAM, "request_timeout": 0}, auth())
    assert status == 400 and body["error"]["param"] == "request_timeout"


def test_disconnect_during_a_non_streaming_request_aborts_it(server):
    idle = kv_free_blocks(server)
    body = json.dumps({**LONG_STREAM, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while kv_free_blocks(server) == idle and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kv_free_blocks(server) < idle
    assert wait_for_free_blocks(server, idle) == idle


def test_a_stalled_reader_does_not_hold_up_the_engine_or_other_streams(server, client):
    idle = kv_free_blocks(server)
    # The stalled stream echoes its prompt with 20 logprob alternatives per token: a quarter
    # megabyte that nobody reads while the request runs.
    prompt = "one two three four five six seven eight nine ten " * 40
    slow_body = completion_body(prompt=prompt, max_tokens=32, temperature=0, ignore_eos=True)
    expected = client.completions.create(**{k: v for k, v in slow_body.items() if k != "ignore_eos"},
                                         extra_body={"ignore_eos": True}).choices[0].text
    payload = json.dumps({**slow_body, "stream": True, "echo": True, "logprobs": 20}).encode()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny receive window
    slow.connect(("127.0.0.1", server.port))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    try:
        # Another client streams to the end while the first reads nothing ...
        chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, stream=True))
        assert stream_text(chunks)[1][0] in ("stop", "length")
        # ... and the engine finishes the stalled request without waiting for its reader.
        assert wait_for_free_blocks(server, idle, timeout=120) == idle
        raw = b""
        slow.settimeout(30)
        while not raw.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked body
            data = slow.recv(1 << 16)
            assert data, "the server closed the stalled stream"
            raw += data
    finally:
        slow.close()
    events = [json.loads(line[6:]) for line in dechunk(raw.split(b"\r\n\r\n", 1)[1]).split(b"\n\n")
              if line.startswith(b"data: {")]
    choices = [e["choices"][0] for e in events]
    assert "".join(c["text"] for c in choices) == prompt + expected
    num_prompt_tokens = request(server, "POST", "/tokenize", {"prompt": prompt}, auth())[1]["count"]
    assert sum(len(c["logprobs"]["tokens"]) for c in choices) == num_prompt_tokens + 32  # each exactly once


def dechunk(body: bytes) -> bytes:
    """Undo HTTP/1.1 chunked transfer encoding."""
    out = b""
    while body:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        out += body[:size]
        body = body[size + 2:]
    return out
