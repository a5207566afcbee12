"""Serving benchmark: replay a dataset against a running server on this machine and report
TTFT, TPOT, ITL and end-to-end latency percentiles, throughput and goodput, as vLLM's
benchmark_serving does (same definitions, same JSON keys).

    octavo serve MODEL --host 127.0.0.1 &
    python -m load_tests.serve_bench --num-prompts 200 --input-len 512 --output-len 256 \\
        --ignore-eos --request-rate 16 --result-file rate16.json
    python -m load_tests.serve_bench --dataset prompts --endpoint chat --max-concurrency 8
    python -m load_tests.serve_bench --mix stream=8,unary=1,disconnect=1,invalid=1 ...

Exits 1 when any request did not behave as its kind expects (see load_tests/client.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
from dataclasses import asdict
from typing import Any

import aiohttp
from tqdm import tqdm

from load_tests import datasets
from load_tests.client import ENDPOINTS, check_loopback
from load_tests.metrics import format_table, parse_goodput, summarize
from load_tests.runner import MAX_REQUESTS, Target, as_text, get_json, parse_mix, plan, run, served_model


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """Flags that serve_bench and soak share: where to send what."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="a server on this machine")
    parser.add_argument("--endpoint", choices=list(ENDPOINTS), default="completions")
    parser.add_argument("--model", help="default: the server's first model")
    parser.add_argument("--api-key", default=os.environ.get("OCTAVO_API_KEY") or os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--dataset", choices=("synthetic", "prompts"), default="synthetic",
                        help="synthetic: random token ids; prompts: the shipped real-text prompts")
    parser.add_argument("--input-len", type=int, default=512, help="synthetic prompt tokens (mean)")
    parser.add_argument("--output-len", type=int, help="max_tokens (synthetic: the mean, default 256; "
                        "prompts: overrides each prompt's own)")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="synthetic lengths uniform in [len * (1 - r), len * (1 + r)]")
    parser.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens tokens")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="Poisson arrivals per second (default: inf, all at once)")
    parser.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--result-file", help="write the results here as JSON")


def make_prompts(args: argparse.Namespace, num: int) -> list[datasets.Prompt]:
    if args.dataset == "prompts":
        return datasets.real_prompts(num, args.seed, args.output_len)
    return datasets.synthetic(num, args.input_len, args.output_len or 256, args.range_ratio, args.seed)


async def connect(args: argparse.Namespace) -> tuple[aiohttp.ClientSession, Target]:
    base_url = check_loopback(args.base_url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    # No connection limit: concurrency is the runner's to decide, not the pool's.
    session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
    model = args.model or await served_model(session, base_url, headers)
    return session, Target(base_url, args.endpoint, model, headers, args.ignore_eos, args.temperature)


def write_json(path: str, args: argparse.Namespace, target: Target, summary: dict[str, Any], extra: dict) -> None:
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "result_file")}
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "base_url": target.base_url,
              "endpoint": target.endpoint, "model": target.model, "config": config, **summary, **extra}
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    session, target = await connect(args)
    async with session:
        prompts = make_prompts(args, args.num_warmups + args.num_prompts)
        if args.endpoint == "chat":
            prompts = await as_text(session, target.base_url, target.headers, prompts)
        warmups, prompts = prompts[:args.num_warmups], prompts[args.num_warmups:]
        mix = parse_mix(args.mix)
        if warmups:
            await run(session, target, plan(warmups, {"stream": 1.0}, args.seed), float("inf"),
                      args.max_concurrency, args.max_duration, args.request_timeout, args.seed, None)
        if args.reset_prefix_cache:
            # Runs against one server replay the same prompts: start each from a cold cache.
            await get_json(session, f"{target.base_url}/v1/internal/reset_prefix_cache", target.headers, "POST")
        with tqdm(total=len(prompts), disable=args.disable_tqdm, desc="requests") as progress:
            results, duration = await run(session, target, plan(prompts, mix, args.seed), args.request_rate,
                                          args.max_concurrency, args.max_duration, args.request_timeout,
                                          args.seed, progress)
    summary = summarize(results, duration, parse_goodput(args.goodput))
    print(format_table(summary))
    if args.result_file:
        extra = {"requests": [asdict(r) for r in results]} if args.save_detailed else {}
        write_json(args.result_file, args, target, summary, extra)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(parser)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--num-warmups", type=int, default=4, help="streamed first, left out of the results")
    parser.add_argument("--mix", default="stream=1",
                        help="request kinds by weight: stream, unary, disconnect, invalid (default: %(default)s)")
    parser.add_argument("--goodput", nargs="+", default=[], metavar="SLO",
                        help="SLOs in ms for goodput: ttft:MS tpot:MS e2el:MS")
    parser.add_argument("--max-duration", type=float, default=3600.0,
                        help="stop sending after this many seconds (default: %(default)s)")
    parser.add_argument("--reset-prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="empty the server's prefix cache after the warm-up (default: on)")
    parser.add_argument("--save-detailed", action="store_true", help="every request's timings in the JSON")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_loopback(args.base_url)
        parse_mix(args.mix)
        parse_goodput(args.goodput)
    except ValueError as e:
        parser.error(str(e))
    if not 1 <= args.num_prompts + args.num_warmups <= MAX_REQUESTS:
        parser.error(f"--num-prompts plus --num-warmups must be in [1, {MAX_REQUESTS}]")
    return args


def main(argv: list[str] | None = None) -> int:
    summary = asyncio.run(bench(parse_args(argv)))
    return 1 if summary["unexpected_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
