"""Speculative decoding through the server: `--speculative-config` as vLLM's, streamed chat
through the OpenAI SDK equal to the engine without speculation, the acceptance counters in
/metrics and the periodic log line."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import openai
import pytest

from engine_core.llm import LLM
from engine_core.protocol import SamplingParams
from test_server import ServerProcess, request

MODEL = "SmolLM2-135M-Instruct"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
TEXT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog."
MESSAGES = [{"role": "user", "content": f"Repeat this text exactly: {TEXT}"}]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OCTAVO_LOG_STATS_INTERVAL", "1")
        proc = ServerProcess("--max-model-len", "512", "--max-num-seqs", "4", "--served-model-name", MODEL,
                             "--speculative-config", json.dumps(SPEC))
    yield proc
    assert proc.stop() == 0, proc.log_text()
    proc.remove_log()


def spec_counters(server: ServerProcess) -> dict[str, float]:
    status, body = request(server, "GET", "/metrics")
    assert status == 200
    counters = {}
    for line in body.decode().splitlines():
        if line.startswith("octavo:spec_decode_num_") and "_total{" in line:
            position = re.search(r'position="(\d+)"', line)
            name = line[len("octavo:"):line.index("_total{")] + (f"[{position.group(1)}]" if position else "")
            counters[name] = float(line.rsplit(" ", 1)[1])
    return counters


def test_streamed_chat_equals_the_engine_without_speculation(server, default_model_dir):
    before = spec_counters(server)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(chunks)

    plain = LLM(str(default_model_dir), max_model_len=512).chat(
        MESSAGES, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]
    assert text == plain.text
    assert TEXT in text  # the model does repeat it, so prompt lookup has something to find

    after = spec_counters(server)
    drafted = after["spec_decode_num_draft_tokens"] - before.get("spec_decode_num_draft_tokens", 0)
    accepted = after["spec_decode_num_accepted_tokens"] - before.get("spec_decode_num_accepted_tokens", 0)
    assert drafted > 0 and accepted > 0.5 * drafted, after
    per_pos = [after[f"spec_decode_num_accepted_tokens_per_pos[{i}]"] for i in range(SPEC["num_speculative_tokens"])]
    assert sum(per_pos) == after["spec_decode_num_accepted_tokens"]
    assert per_pos == sorted(per_pos, reverse=True)  # a draft is accepted only after those before it
    # Several tokens per step: fewer streamed chunks than tokens.
    assert len([c for c in chunks if c]) < len(plain.token_ids)


def test_log_line_reports_acceptance(server):
    deadline = time.monotonic() + 5
    while not (lines := [line for line in server.log_text().splitlines() if "SpecDecoding metrics" in line]):
        assert time.monotonic() < deadline, server.log_text()[-2000:]
        time.sleep(0.2)
    found = re.search(r"Mean acceptance length: ([\d.]+), Accepted: (\d+) tokens, Drafted: (\d+) tokens", lines[-1])
    assert found, lines[-1]
    assert 1.0 < float(found.group(1)) <= 1 + SPEC["num_speculative_tokens"]
    assert 0 < int(found.group(2)) <= int(found.group(3))


def test_bad_speculative_config_is_a_usage_error():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "frontend.cli", "serve", "--speculative-config",
                           '{"method": "ngram", "num_speculative_tokens": 99}'], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "num_speculative_tokens must be in [1, 16], got 99" in done.stderr
