"""Drive a load run: issue requests at a Poisson rate and/or up to a fixed concurrency, bounded
in time, and ask the server about its state (model, KV blocks, requests it still holds)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from tqdm import tqdm

from load_tests.client import KINDS, RequestResult, RequestSpec, send
from load_tests.datasets import Prompt

MAX_REQUESTS = 100_000  # a bound on any one run, whatever it is asked


@dataclass(frozen=True)
class Target:
    base_url: str  # loopback, checked by client.check_loopback
    endpoint: str  # "completions" or "chat"
    model: str
    headers: dict[str, str]
    ignore_eos: bool
    temperature: float


def parse_mix(text: str) -> dict[str, float]:
    """`stream=0.7,unary=0.1,disconnect=0.1,invalid=0.1` -> weights by request kind."""
    mix = {}
    for item in text.split(","):
        kind, _, weight = item.partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} in the mix; kinds are {', '.join(KINDS)}")
        mix[kind] = float(weight or 1)
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix weights must be >= 0 and not all 0: {text!r}")
    return mix


def plan(prompts: Iterable[Prompt], mix: dict[str, float], seed: int) -> Iterator[RequestSpec]:
    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    for index, prompt in enumerate(prompts):
        yield RequestSpec(rng.choices(kinds, weights)[0], prompt, index)


async def run(session: aiohttp.ClientSession, target: Target, specs: Iterable[RequestSpec], request_rate: float,
              max_concurrency: int | None, duration_limit: float, drain_timeout: float, seed: int,
              progress: tqdm | None) -> tuple[list[RequestResult], float]:
    """Send `specs` (at most MAX_REQUESTS) with Poisson arrivals at `request_rate` per second
    (inf: at once), never more than `max_concurrency` at a time; stop sending after
    `duration_limit` seconds and cancel what is still running `drain_timeout` seconds later.
    Returns the results and the run's wall time."""
    rng = random.Random(seed)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    tasks: dict[asyncio.Task[RequestResult], RequestSpec] = {}

    async def one(spec: RequestSpec) -> RequestResult:
        try:
            return await send(session, target.base_url, target.endpoint, spec, target.model, target.ignore_eos,
                              target.temperature, target.headers)
        finally:
            if slots is not None:
                slots.release()
            if progress is not None:
                progress.update(1)

    start = time.perf_counter()
    for spec in specs:
        if len(tasks) >= MAX_REQUESTS or time.perf_counter() - start >= duration_limit:
            break
        if slots is not None:
            # Waiting here, not in the task, keeps a closed loop's memory bounded: a request
            # exists only once it can be sent.
            await slots.acquire()
        tasks[asyncio.create_task(one(spec))] = spec
        if math.isfinite(request_rate):
            await asyncio.sleep(rng.expovariate(request_rate))
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    duration = time.perf_counter() - start
    results = []
    for task, spec in tasks.items():
        if task.cancelled():
            results.append(RequestResult(spec.kind, error="still running at the time limit"))
        else:
            results.append(task.result())
    return results, duration


# ---------------------------------------------------------------- the server's side


async def get_json(session: aiohttp.ClientSession, target_url: str, headers: dict[str, str],
                   method: str = "GET", body: Any = None) -> Any:
    async with session.request(method, target_url, json=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{method} {target_url}: HTTP {response.status}: {(await response.text())[:300]}")
        return await response.json()


async def served_model(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> str:
    return (await get_json(session, f"{base_url}/v1/models", headers))["data"][0]["id"]


async def as_text(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str],
                  prompts: list[Prompt]) -> list[Prompt]:
    """Synthetic token-id prompts as text, for chat: the server's own detokenization of them."""
    texts = []
    for prompt in prompts:
        if prompt.token_ids is None:
            texts.append(prompt)
            continue
        body = await get_json(session, f"{base_url}/detokenize", headers, "POST", {"tokens": prompt.token_ids})
        texts.append(Prompt(body["prompt"], None, prompt.output_len))
    return texts


async def server_state(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> dict[str, Any]:
    """KV blocks (free / total) and the requests the frontend still holds."""
    kv = await get_json(session, f"{base_url}/v1/internal/kv_cache", headers)
    requests = await get_json(session, f"{base_url}/v1/internal/requests", headers)
    return {**kv, **requests}


def is_idle(state: dict[str, Any]) -> bool:
    return (state["num_free_blocks"] == state["num_total_blocks"] and state["admitted"] == 0
            and state["engine_requests"] == 0)


async def wait_idle(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str],
                    timeout: float) -> dict[str, Any]:
    """The server's state once idle, or as it is after `timeout` seconds (aborted requests
    free their blocks at the engine's next step, so idleness may take a moment)."""
    deadline = time.monotonic() + timeout
    while not is_idle(state := await server_state(session, base_url, headers)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return state
