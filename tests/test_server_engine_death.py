"""Killing the engine-core process under a live server: /health turns 503 within a second,
in-flight requests end with an error (an error event before [DONE] for streams), new ones get
503, and the API process exits on its own instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

from test_server import API_KEY, CHAT, MODEL, ServerProcess, engine_is_gone, request


def raw_post(port: int, body: dict, sink: list[bytes]) -> None:
    """POST and keep everything the server sends, until it closes or the body ends."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        sock.settimeout(60)
        while data := sock.recv(1 << 16):
            sink.append(data)


def test_killing_the_engine():
    server = ServerProcess("--max-model-len", "512", "--api-key", API_KEY)
    try:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        streamed: list[bytes] = []
        unstreamed: list[bytes] = []
        threads = [threading.Thread(target=raw_post, args=(server.port, {**body, "stream": True}, streamed)),
                   threading.Thread(target=raw_post, args=(server.port, body, unstreamed))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while b'"content":"' not in b"".join(streamed).replace(b'"content":""', b""):
            assert time.monotonic() < deadline, "the stream never produced text"
            time.sleep(0.02)

        engine_pid = server.engine_pid
        os.kill(engine_pid, signal.SIGKILL)
        killed = time.monotonic()
        while request(server, "GET", "/health")[0] != 503:
            time.sleep(0.02)
        assert time.monotonic() - killed < 1.0

        status, error = request(server, "POST", "/v1/chat/completions", {**body, "max_tokens": 4},
                                {"Authorization": f"Bearer {API_KEY}"})
        assert status == 503 and error["error"]["code"] == "engine_dead"

        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "an in-flight request hung"
        stream = b"".join(streamed)
        error_at = stream.index(b'data: {"error":')
        assert stream.index(b"data: [DONE]") > error_at
        head, _, rest = b"".join(unstreamed).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert b'"engine_dead"' in rest

        # The API process does not hang: it exits by itself, reporting the failure.
        assert server.proc.wait(timeout=30) != 0
        assert engine_is_gone(engine_pid)
        assert "engine core process exited with code -9" in server.log_text()
        server.remove_log()
    finally:
        server.stop()
