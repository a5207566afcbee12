"""The engine-core process over real ZMQ sockets, driven by the frontend's EngineClient.

One engine process (default model, small context and KV cache) serves the whole module; the
last test kills it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from tokenizers import Tokenizer

from engine_core.config import EngineConfig
from engine_core.protocol import EngineCoreRequest, SamplingParams
from frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from frontend.engine_client import EngineClient
from frontend.errors import APIError
from frontend.output_processor import ChoiceDelta, RequestOutputCollector, RequestState

CONFIG = EngineConfig(max_model_len=512, kv_cache_memory=64 << 20)
PROMPT = "Write a short poem about the sea."


class Harness:
    """An event loop, a started EngineClient and the model's tokenizer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = EngineClient(CONFIG)
        self.ready = self.run(self.client.start())
        self.tokenizer = Tokenizer.from_file(str(Path(self.ready.model_path) / "tokenizer.json"))
        self._ids = iter(range(1_000_000))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def submit(self, params: SamplingParams, prompt: list[int] | None = None, stop: list[str] | None = None
               ) -> tuple[str, RequestOutputCollector]:
        request_id = f"test-{next(self._ids)}"
        prompt = prompt if prompt is not None else self.tokenizer.encode(PROMPT).ids
        collector = RequestOutputCollector()
        state = RequestState(request_id, 0, collector, IncrementalDetokenizer(self.tokenizer, prompt, True),
                             StopStringMatcher(stop, False) if stop else None, False)
        self.client.add_request(EngineCoreRequest(request_id, prompt, params, time.time()), state)
        return request_id, collector

    async def collect(self, collector: RequestOutputCollector) -> ChoiceDelta:
        total: ChoiceDelta | None = None
        while total is None or not total.finished:
            delta = (await asyncio.wait_for(collector.get(), 60))[0]
            if total is None:
                total = delta
            else:
                total.merge(delta)
        return total

    def generate(self, params: SamplingParams, **kwargs) -> ChoiceDelta:
        return self.run(self.collect(self.submit(params, **kwargs)[1]))

    def kv_stats(self) -> dict[str, float]:
        return self.run(self.client.call_utility("get_kv_cache_stats"))

    def wait_free_blocks(self, target: float, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while (free := self.kv_stats()["num_free_blocks"]) != target and time.monotonic() < deadline:
            time.sleep(0.05)
        return free


@pytest.fixture(scope="module")
def engine() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.run(harness.client.shutdown())
    harness.loop.close()


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def test_handshake_describes_the_engine(engine):
    ready = engine.ready
    assert ready.max_model_len == 512
    assert ready.kv_capacity_tokens == ready.num_kv_blocks * ready.block_size >= 512
    assert ready.max_concurrency == pytest.approx(ready.kv_capacity_tokens / 512)
    assert ready.vocab_size == engine.tokenizer.get_vocab_size()
    assert ready.eos_token_ids and ready.device == "cpu"
    assert (Path(ready.model_path) / "tokenizer.json").is_file()


def test_greedy_generation_with_logprobs(engine):
    result = engine.generate(msgspec.structs.replace(GREEDY, logprobs=2))
    assert result.finish_reason == "length" and result.error is None
    assert result.num_output_tokens == len(result.token_ids) == 12
    assert result.text == engine.tokenizer.decode(result.token_ids)
    logprobs = result.logprobs
    assert logprobs is not None and len(logprobs.token_ids) == 12
    for sampled, row_ids, row_lps in zip(result.token_ids, logprobs.token_ids, logprobs.logprobs):
        assert row_ids[0] == sampled and len(row_ids) == len(row_lps) == 3
        assert row_lps[0] == pytest.approx(max(row_lps), abs=1e-5)  # greedy picks the argmax
    assert engine.generate(GREEDY).text == result.text  # deterministic


def test_pending_deltas_coalesce_while_nobody_reads(engine):
    request_id, collector = engine.submit(GREEDY)
    deadline = time.monotonic() + 60
    while request_id in engine.client.processor.requests and time.monotonic() < deadline:
        engine.run(asyncio.sleep(0.05))  # the output loop runs; the collector is not read
    deltas = engine.run(collector.get())
    assert list(deltas) == [0]
    delta = deltas[0]
    assert delta.finished and len(delta.token_ids) == 12
    assert delta.text == engine.generate(GREEDY).text


def test_utility_calls(engine):
    stats = engine.kv_stats()
    assert stats["num_total_blocks"] == engine.ready.num_kv_blocks
    assert 0 <= stats["num_free_blocks"] <= stats["num_total_blocks"]
    assert engine.run(engine.client.call_utility("reset_prefix_cache")) is True
    with pytest.raises(APIError, match="unknown utility method"):
        engine.run(engine.client.call_utility("shutdown"))


def test_a_bad_request_fails_alone(engine):
    bad = engine.generate(GREEDY, prompt=[engine.ready.vocab_size + 5])
    assert bad.finish_reason == "error" and bad.error is not None and bad.error.status == 400
    assert str(engine.ready.vocab_size) in bad.error.info.message
    assert engine.generate(GREEDY).finish_reason == "length"


def test_abort_returns_the_blocks(engine):
    idle = engine.kv_stats()["num_free_blocks"]
    request_id, collector = engine.submit(SamplingParams(temperature=0.0, max_tokens=450, ignore_eos=True))
    engine.run(asyncio.wait_for(collector.get(), 60))  # running now
    assert engine.kv_stats()["num_free_blocks"] < idle
    engine.client.abort([request_id])
    assert engine.wait_free_blocks(idle) == idle
    assert request_id not in engine.client.processor.requests


def test_a_stop_string_aborts_the_engine_request(engine):
    text = engine.generate(GREEDY).text
    stop = text[3:6]
    idle = engine.kv_stats()["num_free_blocks"]
    result = engine.generate(SamplingParams(temperature=0.0, max_tokens=450, ignore_eos=True), stop=[stop])
    assert result.finish_reason == "stop" and result.stop_reason == stop
    assert result.text == text[:text.index(stop)]
    # Aborted at once, not run to its 450 tokens.
    assert engine.wait_free_blocks(idle, timeout=3.0) == idle


def test_lifeline_eof_stops_a_loading_engine(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "engine_core.core_process", f"ipc://{tmp_path}/in",
                             f"ipc://{tmp_path}/out"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(msgspec.json.encode(CONFIG) + b"\n")
    proc.stdin.close()  # as if the API process had died
    assert proc.wait(timeout=120) == 0


def test_killed_engine_fails_in_flight_requests_at_once(engine):
    _, collector = engine.submit(SamplingParams(temperature=0.0, max_tokens=450, ignore_eos=True))
    engine.run(asyncio.wait_for(collector.get(), 60))
    assert engine.client.pid is not None
    os.kill(engine.client.pid, signal.SIGKILL)
    started = time.monotonic()
    delta = engine.run(engine.collect(collector))
    assert time.monotonic() - started < 1.0
    assert delta.finish_reason == "error" and delta.error is not None and delta.error.status == 500
    assert engine.client.dead.is_set() and "-9" in (engine.client.dead_reason or "")
    with pytest.raises(APIError) as raised:
        engine.submit(GREEDY)
    assert raised.value.status == 503
