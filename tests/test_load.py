"""load_tests against a real server on the default model: a short mixed load run and a short
soak, both through the command lines people use; plus the generator's definitions offline.

One server serves the module; generations are a few tokens, so this stays well under a minute
of serving on two CPU cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests.client import RequestResult, check_loopback
from load_tests.datasets import real_prompts, synthetic
from load_tests.metrics import parse_goodput, summarize
from load_tests.runner import parse_mix
from test_server import ServerProcess, request

API_KEY = "load-key"
MAX_NUM_SEQS = 8
OUTPUT_LEN = 4


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("--max-model-len", "1024", "--max-num-seqs", str(MAX_NUM_SEQS), "--api-key", API_KEY)
    yield proc
    assert proc.stop() == 0, proc.log_text()
    proc.remove_log()


def run_tool(module: str, server: ServerProcess, result_file: Path, *args: str) -> tuple[str, dict]:
    done = subprocess.run([sys.executable, "-m", module, "--base-url", server.url, "--api-key", API_KEY,
                           "--disable-tqdm", "--result-file", str(result_file), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(result_file.read_text())


def server_state(server: ServerProcess) -> dict:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return {**request(server, "GET", "/v1/internal/kv_cache", headers=headers)[1],
            **request(server, "GET", "/v1/internal/requests", headers=headers)[1]}


def assert_idle(server: ServerProcess) -> None:
    state = server_state(server)
    assert state["num_free_blocks"] == state["num_total_blocks"], state
    assert state["admitted"] == 0 and state["engine_requests"] == 0, state


def table_row(stdout: str, label: str) -> list[float]:
    """mean, median, p90, p99 of one metric from the printed table."""
    found = re.search(rf"^{label}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", stdout, re.MULTILINE)
    assert found, stdout
    return [float(v) for v in found.groups()]


# ---------------------------------------------------------------- against the server


def test_mixed_load_run(server, tmp_path):
    """Chat: streams, unary requests, disconnects and invalid bodies at once."""
    stdout, result = run_tool("load_tests.serve_bench", server, tmp_path / "mixed.json", "--endpoint", "chat",
                              "--num-prompts", "24", "--num-warmups", "1", "--input-len", "32",
                              "--output-len", str(OUTPUT_LEN), "--ignore-eos", "--max-concurrency", "8",
                              "--mix", "stream=4,unary=1,disconnect=1,invalid=1", "--save-detailed")
    assert result["unexpected_errors"] == 0 and result["num_requests"] == 24
    kinds = result["by_kind"]
    assert set(kinds) == {"stream", "unary", "disconnect", "invalid"}, kinds  # seed 0 draws every kind
    assert sum(k["sent"] for k in kinds.values()) == 24 and all(k["ok"] == k["sent"] for k in kinds.values())
    assert result["completed"] == kinds["stream"]["sent"] + kinds["unary"]["sent"]
    assert result["total_output_tokens"] == OUTPUT_LEN * result["completed"]
    for r in result["requests"]:
        if r["kind"] == "stream":
            assert 0 < r["ttft"] <= r["latency"] and len(r["itl"]) <= OUTPUT_LEN - 1
    assert re.search(r"^Unexpected errors:\s+0$", stdout, re.MULTILINE), stdout
    assert_idle(server)  # the disconnected requests were aborted and freed their blocks


def test_poisson_stream_run_percentiles(server, tmp_path):
    """Completions on synthetic token ids at a Poisson rate: the printed table is consistent."""
    stdout, result = run_tool("load_tests.serve_bench", server, tmp_path / "rate.json", "--num-prompts", "10",
                              "--input-len", "32", "--range-ratio", "0.5", "--output-len", str(OUTPUT_LEN),
                              "--ignore-eos", "--request-rate", "20", "--goodput", "ttft:60000", "tpot:60000")
    assert result["completed"] == 10 and result["unexpected_errors"] == 0
    # Synthetic output lengths vary with --range-ratio too; each matched its max_tokens (ignore_eos).
    assert 10 * OUTPUT_LEN // 2 <= result["total_output_tokens"] <= 10 * OUTPUT_LEN * 3 // 2
    assert 10 * 16 <= result["total_input_tokens"] <= 10 * 48
    ttft, tpot, itl, e2e = (table_row(stdout, label) for label in ("TTFT", "TPOT", "ITL", "E2E latency"))
    for row in (ttft, tpot, itl, e2e):
        assert 0 < row[1] <= row[2] <= row[3]  # median <= p90 <= p99
    assert all(t <= e for t, e in zip(ttft, e2e))  # streams only: TTFT <= E2E at every statistic
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])  # generous SLOs
    assert_idle(server)


def test_soak(server, tmp_path):
    stdout, result = run_tool("load_tests.soak", server, tmp_path / "soak.json", "--duration", "15",
                              "--max-concurrency", "4", "--dataset", "synthetic", "--input-len", "32",
                              "--output-len", str(OUTPUT_LEN))
    assert result["passed"] and "FAIL" not in stdout, stdout
    assert result["num_requests"] >= 4 and result["by_kind"]["stream"]["sent"] > 0, stdout
    assert {str(server.proc.pid), str(server.engine_pid)} <= set(result["rss_mib"])
    assert_idle(server)


# ---------------------------------------------------------------- offline


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.1.2.3:8000", "http://0.0.0.0:8000",
                                 "https://127.0.0.1:8000", "http://localhost.evil.com"])
def test_refuses_targets_off_this_machine(url):
    with pytest.raises(ValueError):
        check_loopback(url)
    done = subprocess.run([sys.executable, "-m", "load_tests.serve_bench", "--base-url", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and ("non-loopback" in done.stderr or "expected http://" in done.stderr)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.9.9.9:1/", "http://localhost:80",
                                 "http://[::1]:8000"])
def test_accepts_loopback_targets(url):
    assert check_loopback(url) == url.rstrip("/")


def stream(ttft: float, latency: float, output_tokens: int, itl: list[float]) -> RequestResult:
    return RequestResult("stream", ok=True, status=200, ttft=ttft, itl=itl, latency=latency, prompt_tokens=10,
                         output_tokens=output_tokens)


def test_summary_uses_vllm_definitions():
    results = [stream(0.1, 1.1, 11, [0.1] * 10), stream(0.3, 0.3, 1, []), stream(0.2, 2.2, 5, [0.5] * 4),
               RequestResult("unary", ok=True, status=200, latency=4.0, prompt_tokens=10, output_tokens=3),
               RequestResult("invalid", ok=True, status=400), RequestResult("stream", error="HTTP 500")]
    summary = summarize(results, 2.0, parse_goodput(["ttft:300", "tpot:200"]))
    assert summary["completed"] == 4 and summary["unexpected_errors"] == 1
    assert summary["total_output_tokens"] == 20 and summary["total_input_tokens"] == 40
    assert summary["request_throughput"] == 2.0 and summary["output_throughput"] == 10.0
    assert summary["total_token_throughput"] == 30.0
    # TPOT = (latency - TTFT) / (tokens - 1): 100 ms and 500 ms; the one-token stream has none.
    assert summary["mean_tpot_ms"] == pytest.approx(300.0) and summary["median_tpot_ms"] == pytest.approx(300.0)
    assert summary["mean_ttft_ms"] == pytest.approx(200.0)  # streams only
    assert summary["mean_itl_ms"] == pytest.approx((10 * 100 + 4 * 500) / 14)
    assert summary["mean_e2el_ms"] == pytest.approx((1100 + 300 + 2200 + 4000) / 4)
    # Good: the first (TTFT 100, TPOT 100) and the one-token stream (TPOT counts as 0).
    assert summary["request_goodput"] == 1.0
    assert summary["by_kind"]["stream"] == {"sent": 4, "ok": 3}


def test_datasets_and_flags():
    prompts = synthetic(50, 100, 20, 0.5, seed=1)
    assert prompts == synthetic(50, 100, 20, 0.5, seed=1)
    assert all(50 <= len(p.token_ids) <= 150 and 10 <= p.output_len <= 30 for p in prompts)
    assert {len(p.token_ids) for p in synthetic(5, 64, 8)} == {64}
    texts = real_prompts(45, seed=0)
    assert len(texts) == 45 and all(p.text and p.output_len > 0 for p in texts)
    assert {p.output_len for p in real_prompts(5, output_len=7)} == {7}
    assert parse_mix("stream=3,invalid") == {"stream": 3.0, "invalid": 1.0}
    for bad in ("streem=1", "stream=0", "stream=-1,unary=2"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    with pytest.raises(ValueError):
        parse_goodput(["latency:100"])
