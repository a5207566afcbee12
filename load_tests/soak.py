"""Soak: mix normal, streaming, disconnecting and invalid requests against a server on this
machine for a given time, then check that nothing leaked.

    python -m load_tests.soak --base-url http://127.0.0.1:8000 --duration 300

Checks, after the load stops and the server settles:
- every request behaved as its kind expects (client.py);
- the server holds no request: none admitted, none awaiting engine outputs, every KV block
  free (GET /v1/internal/requests and /v1/internal/kv_cache);
- memory is flat: the resident set of the server and of each process under it (the engine
  core) grew by at most --max-rss-growth-mib from the end of the warm-up (the first
  --warmup-fraction of the run, which has allocated whatever a steady state needs) to the end.
The server's processes are found by the port it listens on, or given with --server-pid.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from load_tests.client import check_loopback
from load_tests.metrics import format_table, summarize
from load_tests.runner import MAX_REQUESTS, as_text, parse_mix, plan, run, wait_idle
from load_tests.serve_bench import add_target_args, connect, make_prompts, write_json

MAX_DURATION_S = 24 * 3600.0
_RSS_SAMPLE_S = 0.5


def listener_pid(port: int) -> int:
    """The process listening on TCP `port` here, found through /proc (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(str(fd.readlink()) in inodes for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:  # not ours to look at, or gone
            continue
    raise LookupError(f"no process of ours listens on port {port}; give --server-pid")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids += process_tree(int(child))
    return pids


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"process {pid} has no VmRSS")


class RssMonitor:
    """Samples the resident set of fixed processes until stopped; remembers the last sample
    before the warm-up ended, the latest one, and every sample after the warm-up (for the
    slope: a leak shows as a steady climb even when it stays under the growth bound)."""

    def __init__(self, pids: list[int], warmup_s: float) -> None:
        self.pids = pids
        self.warmup_s = warmup_s
        self.baseline: dict[int, float] = {}
        self.latest: dict[int, float] = {}
        self.peak: dict[int, float] = {}
        self.after_warmup: dict[int, list[tuple[float, float]]] = {pid: [] for pid in pids}  # (s, MiB)

    def sample(self, elapsed: float) -> None:
        self.latest = {pid: rss_mib(pid) for pid in self.pids}
        self.peak = {pid: max(self.peak.get(pid, 0.0), rss) for pid, rss in self.latest.items()}
        if elapsed > self.warmup_s:
            for pid, rss in self.latest.items():
                self.after_warmup[pid].append((elapsed, rss))

    async def watch(self) -> None:
        start = time.monotonic()
        while True:
            self.sample(time.monotonic() - start)
            if time.monotonic() - start <= self.warmup_s or not self.baseline:
                self.baseline = dict(self.latest)
            await asyncio.sleep(_RSS_SAMPLE_S)

    def slope_mib_per_hour(self, pid: int) -> float:
        """Least-squares slope of the samples after the warm-up."""
        points = self.after_warmup[pid]
        if len(points) < 2:
            return 0.0
        mean_t = sum(t for t, _ in points) / len(points)
        mean_m = sum(m for _, m in points) / len(points)
        var_t = sum((t - mean_t) ** 2 for t, _ in points)
        return 3600.0 * sum((t - mean_t) * (m - mean_m) for t, m in points) / var_t


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    pids = process_tree(args.server_pid or listener_pid(urlsplit(args.base_url).port or 80))
    session, target = await connect(args)
    monitor = RssMonitor(pids, args.duration * args.warmup_fraction)
    async with session:
        prompts = make_prompts(args, args.num_prompts)
        if args.endpoint == "chat":
            prompts = await as_text(session, target.base_url, target.headers, prompts)
        forever = (prompts[i % len(prompts)] for i in range(MAX_REQUESTS))
        started = time.monotonic()
        watcher = asyncio.create_task(monitor.watch())
        with tqdm(disable=args.disable_tqdm, desc="soak requests") as progress:
            results, duration = await run(session, target, plan(forever, parse_mix(args.mix), args.seed),
                                          args.request_rate, args.max_concurrency, args.duration,
                                          args.request_timeout, args.seed, progress)
        state = await wait_idle(session, target.base_url, target.headers, args.settle_timeout)
        watcher.cancel()
        monitor.sample(time.monotonic() - started)
    summary = summarize(results, duration, {})
    growth = {pid: monitor.latest[pid] - monitor.baseline[pid] for pid in pids}
    checks = {
        "no unexpected errors": summary["unexpected_errors"] == 0,
        "no request admitted": state["admitted"] == 0,
        "no request awaiting engine outputs": state["engine_requests"] == 0,
        "every KV block free": state["num_free_blocks"] == state["num_total_blocks"],
        f"RSS growth <= {args.max_rss_growth_mib:g} MiB": all(g <= args.max_rss_growth_mib for g in growth.values()),
    }
    print(format_table(summary, "Soak Result"))
    print(f"server state after the run: {state}")
    for pid in pids:
        print(f"pid {pid}: RSS {monitor.baseline[pid]:.0f} MiB after warm-up -> {monitor.latest[pid]:.0f} MiB "
              f"at the end (peak {monitor.peak[pid]:.0f}, growth {growth[pid]:+.1f} MiB, slope after the "
              f"warm-up {monitor.slope_mib_per_hour(pid):+.2f} MiB/hour)")
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    extra = {"server_state": state, "checks": checks, "passed": all(checks.values()),
             "rss_mib": {str(pid): {"baseline": monitor.baseline[pid], "end": monitor.latest[pid],
                                    "peak": monitor.peak[pid], "slope_mib_per_hour": monitor.slope_mib_per_hour(pid)}
                        for pid in pids}}
    if args.result_file:
        write_json(args.result_file, args, target, summary, extra)
    return {**summary, **extra}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(parser)
    parser.set_defaults(dataset="prompts", output_len=32, ignore_eos=True, max_concurrency=8)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=200, help="distinct prompts, cycled")
    parser.add_argument("--mix", default="stream=4,unary=2,disconnect=2,invalid=1",
                        help="request kinds by weight (default: %(default)s)")
    parser.add_argument("--warmup-fraction", type=float, default=0.3,
                        help="the RSS baseline is taken this far into the run (default: %(default)s)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                        help="allowed RSS growth per process after the warm-up (default: %(default)s)")
    parser.add_argument("--settle-timeout", type=float, default=30.0,
                        help="seconds the server may take to become idle after the load (default: %(default)s)")
    parser.add_argument("--server-pid", type=int, help="default: the process listening on --base-url's port")
    args = parser.parse_args(argv)
    try:
        check_loopback(args.base_url)
        parse_mix(args.mix)
    except ValueError as e:
        parser.error(str(e))
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds")
    if not 0.0 <= args.warmup_fraction < 1.0:
        parser.error("--warmup-fraction must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    summary = asyncio.run(soak(parse_args(argv)))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
