"""Keeps an engine core behind the server: starts it, starts a new one when it dies, and gives
up when it dies too often, so that an orchestrator sees a crash loop instead of a server that
answers 503 forever.

Each engine-core process has its own `EngineClient` (sockets, in-flight requests). When one
dies, its client has already failed the requests it was serving; the dead client stays
current while the next one loads, so new requests and `/health` get 503 with Retry-After until
the new engine is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from engine_core.config import EngineConfig
from engine_core.protocol import EngineReady
from frontend.engine_client import EngineClient, EngineStartError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a dead engine unless it has died more than `max_restarts` times within the
    last `window_s` seconds (a failed start counts as a death)."""

    max_restarts: int = 3
    window_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_engine_restarts must be >= 0, got {self.max_restarts}")
        if not self.window_s > 0:
            raise ValueError(f"engine_restart_window must be > 0 seconds, got {self.window_s}")


class EngineSupervisor:
    def __init__(self, config: EngineConfig, policy: RestartPolicy) -> None:
        self.config = config
        self.policy = policy
        self.client = EngineClient(config)  # the current engine; replaced once a new one is ready
        self.gave_up = asyncio.Event()  # set when the engine died too often to restart it
        self.on_restart: Callable[[], None] = lambda: None  # counts restarts (set by the server)
        self._deaths: deque[float] = deque()  # monotonic times within the policy's window
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> EngineReady:
        """Start the first engine; its failure to start is the server's failure to start."""
        return await self.client.start()

    def supervise(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def _supervise(self) -> None:
        while True:
            await self.client.dead.wait()
            dead = self.client
            if not self._may_restart(dead.dead_reason or "unknown"):
                return
            await dead.shutdown()  # reaps the process, removes its sockets
            candidate = await self._start_new(dead)
            if candidate is None:
                return
            self.client = candidate
            self.on_restart()
            logger.info("the new engine core (pid %s) is ready", candidate.pid)

    def _may_restart(self, reason: str) -> bool:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths[0] < now - self.policy.window_s:
            self._deaths.popleft()
        if len(self._deaths) > self.policy.max_restarts:
            logger.error("the engine core died (%s) %d times within %.0f s (at most %d restarts allowed): "
                         "giving up", reason, len(self._deaths), self.policy.window_s, self.policy.max_restarts)
            self.gave_up.set()
            return False
        logger.error("the engine core died (%s): starting a new one", reason)
        return True

    async def _start_new(self, dead: EngineClient) -> EngineClient | None:
        """A started engine, or None when starting failed too often."""
        while True:
            candidate = EngineClient(self.config)
            candidate.stat_loggers = dead.stat_loggers
            try:
                await candidate.start()
                return candidate
            except EngineStartError as e:
                await candidate.shutdown()
                if not self._may_restart(str(e)):
                    return None
            except BaseException:  # cancelled by shutdown mid-start: stop the half-started engine
                await candidate.shutdown()
                raise

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.shutdown()
