"""Start `octavo serve` on this machine, benchmark it at several request rates (then optionally
soak it), print one markdown row per rate and stop it: the serving figures of docs/benchmarks.md.

    python -m load_tests.make_random_model /tmp/qwen3-0.6b-random
    python -m load_tests.serve_sweep /tmp/qwen3-0.6b-random --rates 4 16 64 inf --soak 60 \\
        --server-args="--dtype bfloat16 --max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 1024"

Every rate replays the same 200 requests of 512 random prompt tokens and 256 output tokens
(ignore_eos): vLLM's serving reference workload. Results go to OUT_DIR as JSON with the
server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from load_tests import serve_bench, soak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, server_args: list[str], log_path: Path,
                 timeout: float) -> subprocess.Popen:
    with open(log_path, "wb") as log:  # the server keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "frontend.cli", "serve", model, "--host", "127.0.0.1",
                                 "--port", str(port), *server_args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return proc
        except OSError:
            time.sleep(1.0)
    why = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not start in {timeout:.0f} s"
    proc.kill()
    raise RuntimeError(f"the server {why}:\n{log_path.read_text()[-4000:]}")


def start_server_in(out_dir: Path, model: str, server_args: str, timeout: float) -> tuple[subprocess.Popen, str]:
    """`start_server` on a free port, its log in OUT_DIR/server.log: the server and its base URL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    return (start_server(model, port, shlex.split(server_args), out_dir / "server.log", timeout),
            f"http://127.0.0.1:{port}")


# Server-side histograms whose means split TTFT: arrival -> first scheduled (queue) and first
# scheduled -> first token (prefill), as the frontend records them.
SPLIT_HISTOGRAMS = ("time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds")


def scrape_sums(base_url: str) -> dict[str, tuple[float, float]]:
    """{histogram: (sum, count)} from the server's /metrics."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: dict[str, list[float]] = {name: [0.0, 0.0] for name in SPLIT_HISTOGRAMS}
    for line in text.splitlines():
        for name in SPLIT_HISTOGRAMS:
            for index, suffix in enumerate(("_sum{", "_count{")):
                if line.startswith(f"octavo:{name}{suffix}"):
                    sums[name][index] = float(line.rsplit(" ", 1)[1])
    return {name: (total, count) for name, (total, count) in sums.items()}


def latency_split(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> str:
    """Mean server-side TTFT, queue and prefill times (ms) between two scrapes."""
    means = []
    for name in SPLIT_HISTOGRAMS:
        count = after[name][1] - before[name][1]
        means.append(1000 * (after[name][0] - before[name][0]) / count if count else float("nan"))
    return "server means: TTFT {:.0f} ms = queue {:.0f} ms + prefill {:.0f} ms".format(*means)


def row(rate: float, s: dict[str, Any]) -> str:
    return (f"| {rate:g} | {s['request_throughput']:.2f} | {s['output_throughput']:,.0f} | "
            f"{s['median_ttft_ms']:.0f} / {s['p99_ttft_ms']:.0f} | "
            f"{s['median_tpot_ms']:.1f} / {s['p99_tpot_ms']:.1f} | "
            f"{s['median_itl_ms']:.1f} / {s['p99_itl_ms']:.1f} | {s['median_e2el_ms']:,.0f} | "
            f"{s['completed']}/{s['num_requests']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 16, 64, float("inf")])
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--soak", type=float, default=0.0, help="then soak for this many seconds (0: no soak)")
    parser.add_argument("--server-args", default="", help="flags for octavo serve, one string")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()

    out = Path(args.out_dir)
    start = time.monotonic()
    server, base_url = start_server_in(out, args.model, args.server_args, args.startup_timeout)
    print(f"server up in {time.monotonic() - start:.0f} s", flush=True)
    rows, results = [], {}
    try:
        for rate in args.rates:
            bench_args = serve_bench.parse_args([
                "--base-url", base_url, "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
                "--output-len", str(args.output_len), "--ignore-eos", "--request-rate", str(rate),
                "--disable-tqdm", "--result-file", str(out / f"rate-{rate:g}.json")])
            before = scrape_sums(base_url)
            results[f"{rate:g}"] = summary = asyncio.run(serve_bench.bench(bench_args))
            rows.append(row(rate, summary))
            print(rows[-1], latency_split(before, scrape_sums(base_url)), sep="\n", flush=True)
        if args.soak:
            soak_args = soak.parse_args(["--base-url", base_url, "--duration", str(args.soak),
                                         "--server-pid", str(server.pid), "--max-concurrency", "64",
                                         "--dataset", "synthetic", "--input-len", str(args.input_len),
                                         "--output-len", "64", "--disable-tqdm",
                                         "--result-file", str(out / "soak.json")])
            results["soak"] = asyncio.run(soak.soak(soak_args))
    finally:
        server.terminate()
        server.wait(60)
    print("\n| rate (req/s) | req/s | out tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) "
          "| E2E p50 (ms) | completed |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    (out / "sweep.json").write_text(json.dumps(results, indent=2, default=str))
    failed = any(s["unexpected_errors"] for s in results.values()) or not results.get("soak", {}).get("passed", True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
