"""Summary statistics of a load run, with vLLM benchmark_serving's definitions and JSON keys.

- TTFT: first text chunk - send; ITL: gaps between text chunks (every stream's, pooled);
  TPOT per request: (latency - TTFT) / (output tokens - 1), for requests of > 1 token;
  E2EL: send to the end of the response (streams and unary requests).
- Throughputs divide by the run's duration: completed requests, output tokens, and prompt
  plus output tokens. Goodput: completed streams meeting every SLO given (a one-token
  request counts as TPOT 0, as in vLLM), per second.
- Percentiles are numpy's (linear interpolation), in milliseconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from load_tests.client import KINDS, RequestResult

PERCENTILES = (90, 99)
METRICS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E latency"}


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`ttft:MS tpot:MS e2el:MS` (any subset) -> {metric: milliseconds}."""
    slos = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"goodput SLOs are ttft:MS, tpot:MS or e2el:MS; got {item!r}")
        slos[name] = float(value)
        if slos[name] <= 0:
            raise ValueError(f"an SLO must be > 0 ms, got {item!r}")
    return slos


def tpot(result: RequestResult) -> float:
    """Seconds per output token after the first; 0 for a one-token request."""
    assert result.ttft is not None
    return (result.latency - result.ttft) / (result.output_tokens - 1) if result.output_tokens > 1 else 0.0


def _stats(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"mean": None, "median": None, "std": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(seconds) * 1000.0
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std()),
            **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict[str, Any]:
    completed = [r for r in results if r.ok and r.kind in ("stream", "unary")]
    streams = [r for r in completed if r.kind == "stream"]
    samples = {
        "ttft": [r.ttft for r in streams if r.ttft is not None],
        "tpot": [tpot(r) for r in streams if r.ttft is not None and r.output_tokens > 1],
        "itl": [gap for r in streams for gap in r.itl],
        "e2el": [r.latency for r in completed],
    }
    good = [r for r in streams if r.ttft is not None and all(
        {"ttft": r.ttft, "tpot": tpot(r), "e2el": r.latency}[name] * 1000.0 <= limit for name, limit in slos.items())]
    input_tokens = sum(r.prompt_tokens for r in completed)
    output_tokens = sum(r.output_tokens for r in completed)
    summary: dict[str, Any] = {
        "duration": duration,
        "num_requests": len(results),
        "completed": len(completed),
        "unexpected_errors": sum(not r.ok for r in results),
        "by_kind": {kind: {"sent": sum(r.kind == kind for r in results),
                           "ok": sum(r.ok for r in results if r.kind == kind)}
                    for kind in KINDS if any(r.kind == kind for r in results)},
        "errors": sorted({r.error for r in results if not r.ok})[:20],
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(completed) / duration,
        "request_goodput": len(good) / duration if slos else None,
        "goodput_slos_ms": slos,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    for metric, values in samples.items():
        for stat, value in _stats(values).items():
            summary[f"{stat}_{metric}_ms"] = value
    return summary


def format_table(summary: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    def row(label: str, value: Any) -> str:
        return f"{label:<40}{value:>12}"

    lines = [f"{' ' + title + ' ':=^52}",
             row("Requests (sent / completed):", f"{summary['num_requests']} / {summary['completed']}"),
             *(row(f"  {kind} (sent / as expected):", f"{c['sent']} / {c['ok']}")
               for kind, c in summary["by_kind"].items()),
             row("Unexpected errors:", summary["unexpected_errors"]),
             row("Benchmark duration (s):", f"{summary['duration']:.2f}"),
             row("Total input tokens:", summary["total_input_tokens"]),
             row("Total generated tokens:", summary["total_output_tokens"]),
             row("Request throughput (req/s):", f"{summary['request_throughput']:.2f}")]
    if summary["request_goodput"] is not None:
        lines.append(row("Request goodput (req/s):", f"{summary['request_goodput']:.2f}"))
        lines.append(row("  under SLOs (ms):", " ".join(f"{k}:{v:g}" for k, v in summary["goodput_slos_ms"].items())))
    lines += [row("Output token throughput (tok/s):", f"{summary['output_throughput']:.1f}"),
              row("Total token throughput (tok/s):", f"{summary['total_token_throughput']:.1f}"),
              "-" * 52,
              f"{'(ms)':<12}" + "".join(f"{h:>10}" for h in ("mean", "median", *(f"p{p}" for p in PERCENTILES)))]
    for metric, label in METRICS.items():
        values = [summary[f"{stat}_{metric}_ms"] for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES))]
        lines.append(f"{label:<12}" + "".join(f"{'-' if v is None else f'{v:.2f}':>10}" for v in values))
    lines.append("=" * 52)
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)
