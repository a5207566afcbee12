"""The server's lifetime with real processes: the engine core killed under load (requests in
flight end at once with an error, /health goes 503, a new engine comes up, a crash loop makes
the server exit 1), SIGTERM under load (drain, then exit 0), and the server itself killed (its
engine and socket directory go with it)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import openai

from test_server import API_KEY, CHAT, MODEL, ServerProcess, engine_is_gone, request

LONG_CHAT = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}


class RawPost(threading.Thread):
    """POST in a thread, keeping everything the server sends and when it closed."""

    def __init__(self, port: int, body: dict) -> None:
        super().__init__()
        self.port, self.body = port, body
        self.data = b""
        self.ended_at = 0.0

    def run(self) -> None:
        payload = json.dumps(self.body).encode()
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                         + payload)
            sock.settimeout(120)
            while chunk := sock.recv(1 << 16):
                self.data += chunk
        self.ended_at = time.monotonic()

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1])

    def has_text(self) -> bool:
        return b'"content":"' in self.data.replace(b'"content":""', b"")


def start_streams(server: ServerProcess, count: int, body: dict) -> list[RawPost]:
    posts = [RawPost(server.port, body) for _ in range(count)]
    for post in posts:
        post.start()
    deadline = time.monotonic() + 120
    while not all(post.has_text() for post in posts):
        assert time.monotonic() < deadline, "the streams never produced text"
        time.sleep(0.05)
    return posts


def ipc_dir(engine_pid: int) -> str:
    """The engine core's socket directory, from its command line (ipc://DIR/input ...)."""
    with open(f"/proc/{engine_pid}/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    address = next(a.decode() for a in args if a.startswith(b"ipc://"))
    return os.path.dirname(address.removeprefix("ipc://"))


def engine_pids(server: ServerProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"started the engine core process \(pid (\d+)\)", server.log_text())]


def wait_for_health(server: ServerProcess, status: int, timeout: float) -> float:
    """Seconds until /health answers `status`."""
    start = time.monotonic()
    while True:
        try:
            if request(server, "GET", "/health", timeout=5)[0] == status:
                return time.monotonic() - start
        except OSError:
            pass
        assert time.monotonic() - start < timeout, f"/health did not answer {status} within {timeout} s"
        time.sleep(0.02)


def test_a_killed_engine_is_replaced_and_a_crash_loop_ends_the_server():
    server = ServerProcess("--max-model-len", "512", "--api-key", API_KEY, "--max-engine-restarts", "1")
    try:
        streams = start_streams(server, 9, {**LONG_CHAT, "stream": True})
        unstreamed = RawPost(server.port, LONG_CHAT)
        unstreamed.start()
        first_engine = server.engine_pid
        first_ipc_dir = ipc_dir(first_engine)
        time.sleep(0.5)  # the non-streaming request reaches the engine

        os.kill(first_engine, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for_health(server, 503, timeout=5) < 1.0
        # Every request in flight ends at once: streams with an error event, then [DONE].
        for post in [*streams, unstreamed]:
            post.join(timeout=30)
            assert not post.is_alive(), "an in-flight request hung"
            assert post.ended_at - killed < 1.0
        for post in streams:
            assert post.data.index(b'data: {"error":') < post.data.index(b"data: [DONE]")
            assert b'"code":"engine_dead"' in post.data
        assert unstreamed.status == 500 and b'"code":"engine_dead"' in unstreamed.data

        # While the new engine loads, new requests get 503 with Retry-After.
        conn_status, body = request(server, "POST", "/v1/chat/completions", {**LONG_CHAT, "max_tokens": 2},
                                    {"Authorization": f"Bearer {API_KEY}"})
        assert conn_status in (200, 503)
        if conn_status == 503:
            assert body["error"]["code"] == "engine_dead"

        assert wait_for_health(server, 200, timeout=30) < 30
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason == "length"
        pids = engine_pids(server)
        assert len(pids) == 2 and engine_is_gone(first_engine)
        assert not os.path.exists(first_ipc_dir)
        metrics = request(server, "GET", "/metrics")[1].decode()
        assert re.search(r'^octavo:engine_restarts_total\{model_name="[^"]+"\} 1\.0$', metrics, re.MULTILINE)

        # A second death within the window is one more than --max-engine-restarts allows.
        second_engine, second_ipc_dir = pids[1], ipc_dir(pids[1])
        os.kill(second_engine, signal.SIGKILL)
        assert server.proc.wait(timeout=30) == 1
        assert engine_is_gone(second_engine) and not os.path.exists(second_ipc_dir)
        assert "giving up" in server.log_text()
        server.remove_log()
    finally:
        server.stop()


def test_sigterm_drains_requests_in_progress_then_exits_0():
    # Its own process group, signalled as a whole as systemd or `timeout` do: the engine core
    # gets the SIGTERM too, and must keep serving until the server has drained.
    # 5 s: ample for the short requests on a loaded 2-core machine, far too little for the long
    # streams' remaining 400-odd tokens.
    server = ServerProcess("--max-model-len", "512", "--api-key", API_KEY, "--shutdown-timeout", "5",
                           new_session=True)
    try:
        long_streams = start_streams(server, 3, {**LONG_CHAT, "stream": True, "max_tokens": 470})
        short = [RawPost(server.port, {**LONG_CHAT, "max_tokens": 8}) for _ in range(3)]
        for post in short:
            post.start()
        deadline = time.monotonic() + 30
        while request(server, "GET", "/v1/internal/requests", headers={"Authorization": f"Bearer {API_KEY}"}
                      )[1]["admitted"] < 6:
            assert time.monotonic() < deadline, "the short requests were never admitted"
            time.sleep(0.02)
        engine = server.engine_pid
        engine_ipc_dir = ipc_dir(engine)

        os.killpg(server.proc.pid, signal.SIGTERM)
        assert wait_for_health(server, 503, timeout=5) < 1.0
        status, body = request(server, "POST", "/v1/chat/completions", {**LONG_CHAT, "max_tokens": 2},
                               {"Authorization": f"Bearer {API_KEY}"})
        assert status == 503 and body["error"]["code"] == "shutting_down"

        for post in [*long_streams, *short]:
            post.join(timeout=60)
            assert not post.is_alive()
        # Requests that could finish did; the others got a clear error once the timeout passed.
        for post in short:
            assert post.status == 200 and b'"finish_reason":"length"' in post.data
        for post in long_streams:
            assert b'"code":"shutting_down"' in post.data
            assert post.data.index(b'data: {"error":') < post.data.index(b"data: [DONE]")
        assert server.proc.wait(timeout=30) == 0
        assert engine_is_gone(engine) and not os.path.exists(engine_ipc_dir)
        log = server.log_text()
        assert "Traceback" not in log and "Exception ignored" not in log, log
        server.remove_log()
    finally:
        server.stop()


def test_a_killed_server_takes_its_engine_and_sockets_with_it():
    server = ServerProcess("--max-model-len", "512")
    try:
        engine = server.engine_pid
        engine_ipc_dir = ipc_dir(engine)
        server.proc.kill()
        server.proc.wait()
        deadline = time.monotonic() + 30
        while not (engine_is_gone(engine) and not os.path.exists(engine_ipc_dir)):
            assert time.monotonic() < deadline, "the engine or its socket directory outlived the server"
            time.sleep(0.05)
        server.remove_log()
    finally:
        server.stop()


def test_a_killed_tensor_parallel_rank_ends_requests_at_once_and_the_engine_restarts():
    # SmolLM2-135M shards over 3 ranks (9 query and 3 KV heads): the gloo path of a multi-GPU server.
    server = ServerProcess("--tensor-parallel-size", "3", "--max-model-len", "512", "--api-key", API_KEY)
    try:
        ranks = [int(pid) for pid in re.findall(r"started tensor-parallel rank \d \(pid (\d+)\)", server.log_text())]
        assert len(ranks) == 3
        streams = start_streams(server, 3, {**LONG_CHAT, "stream": True})
        first_engine = server.engine_pid

        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for_health(server, 503, timeout=5) < 1.5
        for post in streams:
            post.join(timeout=30)
            assert not post.is_alive(), "an in-flight request hung"
            assert post.ended_at - killed < 1.5
            assert post.data.index(b'data: {"error":') < post.data.index(b"data: [DONE]")
            assert b'"code":"engine_dead"' in post.data
        # The engine core and its surviving ranks are gone: nothing is orphaned.
        deadline = time.monotonic() + 10
        while not all(engine_is_gone(pid) for pid in [first_engine, *ranks]):
            assert time.monotonic() < deadline, "a process of the dead engine lives on"
            time.sleep(0.05)

        assert wait_for_health(server, 200, timeout=90) < 90
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
        assert "Red" in reply.choices[0].message.content  # "1. Red\n2. Blue\n3. Green", as at TP=1
        new_ranks = re.findall(r"started tensor-parallel rank \d \(pid (\d+)\)", server.log_text())[3:]
        assert len(new_ranks) == 3
        server.remove_log()
    finally:
        server.stop()
