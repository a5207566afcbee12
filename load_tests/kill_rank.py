"""Kill one tensor-parallel rank of a live server under load: issue #21's fault run.

    python -m load_tests.kill_rank MODEL --server-args="--tensor-parallel-size 2 --dtype bfloat16"
    python -m load_tests.kill_rank MODEL --server-args="--tensor-parallel-size 3" --streams 4   # CPU, gloo

Starts `octavo serve` (the flags must ask for two ranks or more), streams --streams long
completions, and once each has produced text sends SIGKILL to rank --rank's worker process.
Reports how long after the kill each stream ended and whether it ended with an error event
before `[DONE]`, when /health turned 503, whether the dead engine's processes (the engine core
and every rank) are all gone, and when the restarted engine served a request again. Exits 1
if a stream hung, ended without an error, or a process of the dead engine lived on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from load_tests.runner import served_model
from load_tests.serve_sweep import start_server_in

RANK_PID = re.compile(r"started tensor-parallel rank (\d+) \(pid (\d+)\)")
ENGINE_PID = re.compile(r"started the engine core process \(pid (\d+)\)")


@dataclass
class StreamEnd:
    seconds_after_kill: float
    error: str | None  # the error event's code, None if the stream ended without one


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"  # exited, not yet reaped


async def stream(session: aiohttp.ClientSession, url: str, body: dict, has_text: asyncio.Event,
                 killed: list[float]) -> StreamEnd:
    """One streamed completion, read to its end: the first chunk with text sets `has_text`."""
    error = None
    try:
        async with session.post(url, json=body) as response:
            async for line in response.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[len(b"data: "):])
                if "error" in event:
                    error = event["error"].get("code") or event["error"].get("type") or "error"
                elif event["choices"] and event["choices"][0].get("text"):
                    has_text.set()
    except asyncio.TimeoutError:
        return StreamEnd(float("inf"), None)  # hung: nothing came for --stream-timeout seconds
    return StreamEnd(time.monotonic() - killed[0] if killed else float("nan"), error)


async def wait_for_health(session: aiohttp.ClientSession, base_url: str, status: int, timeout: float) -> float:
    """Seconds until /health answers `status` (inf if it never did within `timeout`)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            async with session.get(f"{base_url}/health") as response:
                if response.status == status:
                    return time.monotonic() - start
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.02)
    return float("inf")


async def run(args: argparse.Namespace, base_url: str, log_path: Path) -> bool:
    log = log_path.read_text()
    ranks = {int(rank): int(pid) for rank, pid in RANK_PID.findall(log)}
    engines = [int(pid) for pid in ENGINE_PID.findall(log)]
    if len(ranks) < 2 or args.rank not in ranks:
        raise SystemExit(f"the server started ranks {sorted(ranks)}: --server-args must ask for "
                         f"--tensor-parallel-size >= 2, and --rank ({args.rank}) must be one of them")
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.stream_timeout)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        model = await served_model(session, base_url, {})
        rng = random.Random(0)
        killed: list[float] = []
        started = [asyncio.Event() for _ in range(args.streams)]
        tasks = [asyncio.create_task(stream(session, f"{base_url}/v1/completions", {
            "model": model, "prompt": [rng.randrange(1000, 10000) for _ in range(args.prompt_len)],
            "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}, has_text, killed))
            for has_text in started]
        try:
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), timeout=120)
        except asyncio.TimeoutError:
            raise SystemExit(f"only {sum(e.is_set() for e in started)} of {args.streams} streams produced text "
                             f"within 120 s: nothing was killed") from None

        os.kill(ranks[args.rank], signal.SIGKILL)
        killed.append(time.monotonic())
        health_503 = await wait_for_health(session, base_url, 503, timeout=10)
        ends = await asyncio.gather(*tasks)
        dead = [ranks[r] for r in sorted(ranks)] + engines[:1]
        gone_after = float("inf")
        while time.monotonic() - killed[0] < 30:
            if all(process_is_gone(pid) for pid in dead):
                gone_after = time.monotonic() - killed[0]
                break
            await asyncio.sleep(0.05)
        health_200 = await wait_for_health(session, base_url, 200, timeout=args.restart_timeout)
        async with session.post(f"{base_url}/v1/completions", json={
                "model": model, "prompt": "Hello", "max_tokens": 8}) as response:
            serves_again = response.status == 200

    latest = max(end.seconds_after_kill for end in ends)
    errors = sum(end.error is not None for end in ends)
    codes = sorted({end.error for end in ends if end.error is not None})
    print(f"killed rank {args.rank} (pid {ranks[args.rank]}) of {len(ranks)} under {args.streams} streams")
    print(f"streams ended with an error event: {errors}/{len(ends)} ({', '.join(codes) or 'none'}), "
          f"the last {latest * 1e3:.0f} ms after the kill")
    print(f"/health 503 after {health_503 * 1e3:.0f} ms; the dead engine's {len(dead)} processes gone after "
          f"{gone_after * 1e3:.0f} ms; /health 200 again after {health_200:.1f} s (the restart); "
          f"a request after it {'succeeded' if serves_again else 'failed'}")
    return errors == len(ends) and gone_after < float("inf") and serves_again


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--server-args", default="--tensor-parallel-size 2", help="flags for octavo serve, one string")
    parser.add_argument("--rank", type=int, default=1, help="the rank whose worker process is killed")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096, help="long enough to be in flight at the kill")
    parser.add_argument("--stream-timeout", type=float, default=60.0, help="a stream silent this long hung")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--restart-timeout", type=float, default=600.0)
    parser.add_argument("--out-dir", default=".")
    args = parser.parse_args()

    out = Path(args.out_dir)
    server, base_url = start_server_in(out, args.model, args.server_args, args.startup_timeout)
    try:
        ok = asyncio.run(run(args, base_url, out / "server.log"))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
