"""/metrics end to end: a real server on the default model, scraped by a real Prometheus server
(Debian's package; installed here if missing and we are root), asked PromQL about what the
tests did.

One server and one Prometheus serve the module. Every check compares the change over a test
with what that test did, so the tests hold in any order. The server runs at most 4 requests
at once, so half of a burst of 8 has to wait; its stats line is logged every second.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from metrics.prometheus import PrometheusStatLogger
from metrics.stats import IterationStats, RequestStats
from test_server import ServerProcess, request

REPO = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
MAX_NUM_SEQS = 4
API_KEY = "metrics-key"
SCRAPE_INTERVAL = "200ms"  # a CPU step takes ~50 ms: a burst spans a few scrapes
LABEL = f'model_name="{MODEL}"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
        found = shutil.which("prometheus")
    if found is None:
        pytest.skip("needs Debian's prometheus package (apt-get install prometheus; .ci/run installs it)")
    return found


class Prometheus:
    """A Prometheus server scraping `target` every SCRAPE_INTERVAL, with the scrape job of
    metrics/prometheus.yml (only the target and the intervals changed)."""

    def __init__(self, target: str, workdir: Path) -> None:
        config = yaml.safe_load((REPO / "metrics" / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                            "evaluation_interval": SCRAPE_INTERVAL}
        config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={self.url[7:]}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_for(lambda: self.query('up{job="octavo"}') == [1.0], "the first scrape", timeout=60)

    def query(self, expr: str) -> list[float]:
        """An instant PromQL query: the values of the result vector (or the scalar)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            if e.code == 503:  # listening, but its storage is not ready yet
                return []
            raise AssertionError(f"{expr}: {e.read().decode()}") from None  # a bad query: say why
        except OSError:
            return []  # not up yet
        assert body["status"] == "success", body
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [float(result[1])]
        return [float(series["value"][1]) for series in result]

    def value(self, expr: str) -> float:
        values = self.query(expr)
        assert len(values) == 1, f"{expr} -> {values}"
        return values[0]

    def sync(self) -> None:
        """Wait for a scrape that began after this call: queries then see the server's present."""
        start = time.time()
        self.wait_for(lambda: self.query(f'timestamp(up{{job="octavo"}}) > {start}'), "a fresh scrape")

    def wait_for(self, condition, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"Prometheus exited:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"Prometheus: no {what} in {timeout} s:\n{self.log_text()}"
            time.sleep(0.1)

    def log_text(self) -> str:
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OCTAVO_LOG_STATS_INTERVAL", "1")
        proc = ServerProcess("--max-model-len", "512", "--max-num-seqs", str(MAX_NUM_SEQS), "--api-key", API_KEY,
                             "--metrics-compat", "vllm")
    yield proc
    assert proc.stop() == 0, proc.log_text()
    proc.remove_log()


@pytest.fixture(scope="module")
def prom(server) -> Iterator[Prometheus]:
    with tempfile.TemporaryDirectory(prefix="octavo-prometheus-") as workdir:
        prometheus = Prometheus(f"127.0.0.1:{server.port}", Path(workdir))
        yield prometheus
        prometheus.stop()


@pytest.fixture(scope="module")
def aclient_factory(server):
    return lambda: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


class Counters:
    """Values of PromQL expressions now, to compare with later: `delta(expr)`."""

    def __init__(self, prom: Prometheus, *exprs: str) -> None:
        self.prom = prom
        prom.sync()
        self.before = {expr: prom.value(expr) for expr in exprs}

    def delta(self, expr: str) -> float:
        return self.prom.value(expr) - self.before[expr]


def metric(name: str, extra: str = "") -> str:
    return f"{name}{{{LABEL}{extra}}}"


TOKENS = metric("octavo:prompt_tokens_total"), metric("octavo:generation_tokens_total")
HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds")
FIRST_BUCKET = {"time_to_first_token_seconds": "0.001", "inter_token_latency_seconds": "0.001",
                "e2e_request_latency_seconds": "0.01"}


def count(histogram: str) -> str:
    return metric(f"octavo:{histogram}_count")


async def run_requests(aclient_factory, jobs: list[dict]) -> list:
    """Each job is a chat (has "messages") or a completion request; all at once."""
    async with aclient_factory() as client:
        calls = [client.chat.completions.create(model=MODEL, **job) if "messages" in job
                 else client.completions.create(model=MODEL, **job) for job in jobs]
        return await asyncio.gather(*calls)


# ---------------------------------------------------------------- token counters and latencies


def test_token_counters_and_histograms_match_responses(server, prom, aclient_factory):
    counters = Counters(prom, *TOKENS, *(count(h) for h in HISTOGRAMS), count("request_prompt_tokens"),
                        metric("octavo:request_generation_tokens_sum"))
    jobs = [{"messages": [{"role": "user", "content": f"Name {n} colors."}], "max_tokens": 6 + 2 * n,
             "temperature": 0.8, "seed": n} for n in range(3)]
    jobs += [{"prompt": f"The {word} was", "max_tokens": 12, "temperature": 0.0} for word in ("river", "city", "king")]
    responses = asyncio.run(run_requests(aclient_factory, jobs))
    prompt_tokens = sum(r.usage.prompt_tokens for r in responses)
    completion_tokens = sum(r.usage.completion_tokens for r in responses)

    prom.sync()
    assert counters.delta(TOKENS[0]) == prompt_tokens
    assert counters.delta(TOKENS[1]) == completion_tokens
    for histogram in HISTOGRAMS:
        expected = len(jobs) if histogram != "inter_token_latency_seconds" else completion_tokens - len(jobs)
        assert counters.delta(count(histogram)) == expected, histogram  # one gap between each two tokens
    assert counters.delta(count("request_prompt_tokens")) == len(jobs)
    assert counters.delta(metric("octavo:request_generation_tokens_sum")) == completion_tokens

    for histogram, first_bucket in FIRST_BUCKET.items():
        for q in (0.5, 0.99):
            quantile = prom.value(f"histogram_quantile({q}, sum by (le) ({metric(f'octavo:{histogram}_bucket')}))")
            assert math.isfinite(quantile) and quantile > 0, (histogram, q, quantile)
        in_first = prom.value(metric(f"octavo:{histogram}_bucket", f',le="{first_bucket}"'))
        assert in_first < prom.value(count(histogram)), f"every {histogram} observation is in the first bucket"


def test_vllm_compat_names_mirror_octavo_names(server, prom):
    prom.sync()
    for octavo, vllm in (("prompt_tokens_total", "prompt_tokens_total"),
                         ("inter_token_latency_seconds_count", "time_per_output_token_seconds_count"),
                         ("inter_token_latency_seconds_count", "inter_token_latency_seconds_count"),
                         ("iteration_tokens_count", "iteration_tokens_total_count"),
                         ("kv_cache_usage_perc", "gpu_cache_usage_perc")):
        assert prom.value(metric(f"vllm:{vllm}")) == prom.value(metric(f"octavo:{octavo}"))
    assert prom.query(metric("vllm:request_success_total", ',finished_reason="length"'))


# ---------------------------------------------------------------- engine state


def test_burst_fills_the_batch_then_everything_drains(server, prom, aclient_factory):
    start = time.time()
    jobs = [{"prompt": f"Story number {i}: once upon a time", "max_tokens": 16, "temperature": 0.0,
             "extra_body": {"ignore_eos": True}} for i in range(2 * MAX_NUM_SEQS)]
    asyncio.run(run_requests(aclient_factory, jobs))
    prom.sync()
    window = f"[{math.ceil(time.time() - start) + 1}s]"
    assert prom.value(f"max_over_time({metric('octavo:num_requests_running')}{window})") == MAX_NUM_SEQS
    assert prom.value(f"max_over_time({metric('octavo:num_requests_waiting')}{window})") >= 1
    assert prom.value(f"max_over_time({metric('octavo:kv_cache_usage_perc')}{window})") > 0
    # After the burst: an empty batch, an empty queue, every KV block free again.
    assert prom.value(metric("octavo:num_requests_running")) == 0
    assert prom.value(metric("octavo:num_requests_waiting")) == 0
    assert prom.value(metric("octavo:kv_cache_usage_perc")) == 0


def test_prefix_cache_hits_after_a_repeated_prompt(server, prom, aclient_factory):
    queries, hits = metric("octavo:prefix_cache_queries_total"), metric("octavo:prefix_cache_hits_total")
    counters = Counters(prom, queries, hits)
    # A fresh nonce first, so the first request finds nothing cached.
    prompt = f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 8
    first, second = (asyncio.run(run_requests(aclient_factory, [{"prompt": prompt, "max_tokens": 1}]))[0]
                     for _ in range(2))
    num_prompt = first.usage.prompt_tokens
    prom.sync()
    assert counters.delta(queries) == 2 * num_prompt
    # Every full block of the prompt but the one holding its last token (recomputed for logits).
    assert counters.delta(hits) == (num_prompt - 1) // 16 * 16 > 0
    assert second.usage.prompt_tokens == num_prompt


def test_success_counts_by_finish_reason(server, prom, aclient_factory):
    reasons = {reason: metric("octavo:request_success_total", f',finished_reason="{reason}"')
               for reason in ("stop", "length", "abort", "error")}
    counters = Counters(prom, *reasons.values(), count("e2e_request_latency_seconds"))
    status, eos = request(server, "POST", "/tokenize", {"prompt": "<|im_end|>", "add_special_tokens": False},
                          {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and eos["count"] == 1
    chat = [{"role": "user", "content": "Name three colors."}]
    responses = asyncio.run(run_requests(aclient_factory, [
        {"messages": chat, "max_tokens": 16, "logit_bias": {str(eos["tokens"][0]): 100}},  # EOS at once
        {"messages": chat, "max_tokens": 32, "stop": [" "]},  # a stop string
        {"messages": chat, "max_tokens": 2},
    ]))
    assert [r.choices[0].finish_reason for r in responses] == ["stop", "stop", "length"]
    abort_one_stream(server)

    prom.wait_for(lambda: counters.delta(reasons["abort"]) == 1, "abort counted")
    assert counters.delta(reasons["stop"]) == 2
    assert counters.delta(reasons["length"]) == 1
    assert counters.delta(reasons["error"]) == 0
    assert counters.delta(count("e2e_request_latency_seconds")) == 3  # latencies of completed requests only
    # The abort emptied the engine, and it said so with no step to follow (on a loaded machine
    # that report may land a scrape after the frontend counted the abort).
    prom.wait_for(lambda: prom.value(metric("octavo:num_requests_running")) == 0, "an empty batch reported")
    assert prom.value(metric("octavo:kv_cache_usage_perc")) == 0


def abort_one_stream(server: ServerProcess) -> None:
    """Start a long streaming completion, read its first event, and hang up."""
    body = json.dumps({"model": MODEL, "prompt": "Count to one thousand:", "max_tokens": 400, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while b"data: " not in received:
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream"
            received += chunk


# ---------------------------------------------------------------- the dashboard and the log line


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((REPO / "metrics" / "grafana_dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_dashboard_query_returns_data(server, prom):
    prom.sync()
    for expr in dashboard_exprs():
        promql = expr.replace("$model_name", MODEL).replace("$__rate_interval", "5m")
        if "spec_decode" in expr:
            # This server does not speculate: no series (the panel says "off"), not 0/0 = NaN.
            assert not prom.query(promql), f"the dashboard query {expr} gives data without drafts"
        else:
            assert prom.query(promql), f"no data for the dashboard query {expr}"


def test_step_size_quantiles_are_token_counts(server, prom):
    prom.sync()
    for expr in dashboard_exprs():
        if "iteration_tokens" in expr:
            promql = expr.replace("$model_name", MODEL).replace("$__rate_interval", "5m")
            values = prom.query(promql)
            assert values and all(v >= 1 and v.is_integer() for v in values), (expr, values)


def test_stats_log_line(server):
    def lines() -> list[str]:
        return [line for line in server.log_text().splitlines() if "Avg prompt throughput" in line]

    assert any("Avg generation throughput: 0.0 tokens/s" not in line for line in lines()), lines()[-3:]
    # Once idle, the line says so (logged each second here; then it goes quiet).
    deadline = time.monotonic() + 5
    while "Running: 0 reqs, Waiting: 0 reqs, KV cache usage: 0.0%" not in lines()[-1]:
        assert time.monotonic() < deadline, lines()[-3:]
        time.sleep(0.2)


def test_metrics_need_no_api_key_and_use_the_text_format(server):
    conn_status, body = request(server, "GET", "/metrics")
    assert conn_status == 200
    assert b"# TYPE octavo:time_to_first_token_seconds histogram" in body


# ---------------------------------------------------------------- without a server


def test_each_logger_has_its_own_registry():
    """Two apps in one process: no shared or clashing metrics, nothing in the global registry."""
    from prometheus_client import REGISTRY

    first = PrometheusStatLogger("a", 512, {"block_size": "16"})
    second = PrometheusStatLogger("a", 512, {"block_size": "16"})
    iteration = IterationStats(timestamp=2.0)
    iteration.update_from_output(RequestStats(arrival_time=1.5, num_prompt_tokens=7), 1, scheduled_time=1.6)
    first.record(None, iteration)
    assert b'octavo:prompt_tokens_total{model_name="a"} 7.0' in first.exposition()
    assert b'octavo:prompt_tokens_total{model_name="a"} 0.0' in second.exposition()
    assert not [family.name for family in REGISTRY.collect() if family.name.startswith("octavo:")]


def test_request_timeline():
    request_stats = RequestStats(arrival_time=10.0, num_prompt_tokens=5)
    first, second, last = IterationStats(10.5), IterationStats(10.6), IterationStats(10.8)
    first.update_from_output(request_stats, 1, scheduled_time=10.2)
    second.update_from_output(request_stats, 1, scheduled_time=0.0)
    last.update_from_output(request_stats, 2, scheduled_time=0.0)
    last.finish(request_stats, "length")
    assert first.num_prompt_tokens == 5 and second.num_prompt_tokens == 0
    assert first.time_to_first_tokens == [0.5] and second.inter_token_latencies == pytest.approx([0.1])
    (done,) = last.finished_requests
    assert done.completed and done.num_generation_tokens == 4
    assert (done.queue_time, done.prefill_time) == pytest.approx((0.2, 0.3))
    assert (done.decode_time, done.e2e_latency) == pytest.approx((0.3, 0.8))
