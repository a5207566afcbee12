"""The API process's handle on the engine-core process: start it, talk to it, notice its death.

Requests go out through a ROUTER bound here (the engine's DEALER connects and announces itself
with its EngineReady handshake); outputs come back through a PULL bound here. Both live in a
private temporary directory. One task drains the outputs, so the engine's sends never wait on a
slow client; another waits on the process itself, so a crash (even a SIGKILL, which sends no
last message) fails every in-flight request at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import sys
import tempfile
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from engine_core.config import EngineConfig
from engine_core.protocol import (
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineReady,
    EngineStartFailure,
    RequestType,
    UtilityRequest,
)
from frontend.errors import APIError, engine_dead, engine_failed
from frontend.output_processor import OutputProcessor, RequestState
from metrics.stats import IterationStats, SchedulerStats, StatLogger

logger = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 10.0


class EngineStartError(RuntimeError):
    pass


class EngineConfigError(EngineStartError):
    """The engine cannot start with this configuration or model; the message names the value."""


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.processor = OutputProcessor()
        # Given every step's stats and what the outputs did to requests (set by the server).
        self.stat_loggers: list[StatLogger] = []
        self.dead_reason: str | None = None
        self.dead = asyncio.Event()  # set once the engine is gone
        self._ctx = zmq.asyncio.Context()
        self._ipc_dir = tempfile.mkdtemp(prefix="octavo-")  # mode 0700: only we can connect
        self._input = self._ctx.socket(zmq.ROUTER)
        self._input.setsockopt(zmq.ROUTER_MANDATORY, 1)  # fail loudly if the engine is gone
        self._input.setsockopt(zmq.SNDHWM, 0)
        self._input.bind(f"ipc://{self._ipc_dir}/input")
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(f"ipc://{self._ipc_dir}/output")
        # Sends never block (no high-water mark) so they are made synchronously, from plain
        # functions; only the handshake uses the asyncio side of the ROUTER.
        self._send_socket = zmq.Socket.shadow(self._input.underlying)
        self._engine_identity = b""
        self._encoder = msgspec.msgpack.Encoder()
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._call_ids = itertools.count()
        self._utility_calls: dict[int, asyncio.Future[Any]] = {}
        self._closing = False

    async def start(self) -> EngineReady:
        """Start the engine-core process and wait for its handshake (it loads the model)."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engine_core.core_process",
            f"ipc://{self._ipc_dir}/input", f"ipc://{self._ipc_dir}/output",
            stdin=asyncio.subprocess.PIPE)
        assert self._proc.stdin is not None
        self._proc.stdin.write(msgspec.json.encode(self.config) + b"\n")
        logger.info("started the engine core process (pid %d); loading the model", self._proc.pid)
        handshake = asyncio.ensure_future(self._input.recv_multipart())
        exited = asyncio.ensure_future(self._proc.wait())
        await asyncio.wait({handshake, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not handshake.done():
            handshake.cancel()
            raise EngineStartError(f"the engine core exited with code {exited.result()} before it was ready "
                                   "(its log above says why)")
        self._engine_identity, payload = handshake.result()
        ready = msgspec.msgpack.decode(payload, type=EngineReady | EngineStartFailure)
        if isinstance(ready, EngineStartFailure):
            await exited
            raise EngineConfigError(ready.reason)
        self._tasks = [asyncio.create_task(self._output_loop(), name="engine-outputs"),
                       asyncio.create_task(self._watch_process(exited), name="engine-watch")]
        return ready

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # ---------------------------------------------------------------- requests

    def add_request(self, request: EngineCoreRequest, state: RequestState) -> None:
        self._check_alive()
        self.processor.add(state, request)
        if not self._send(RequestType.ADD, self._encoder.encode(request)):
            self._check_alive()

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests still in flight (a disconnect, a stop string); others are ignored."""
        iteration = IterationStats(time.time())
        in_flight = self.processor.abort(request_ids, iteration)
        if in_flight:
            self._record_stats(None, iteration)
            if self.dead_reason is None:
                self._send(RequestType.ABORT, self._encoder.encode(in_flight))

    async def call_utility(self, method: str, *args: Any) -> Any:
        """Call an EngineCore utility method by name; returns its (msgpack-decoded) result."""
        self._check_alive()
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._utility_calls[call_id] = future
        call = UtilityRequest(call_id, method, [msgspec.Raw(self._encoder.encode(a)) for a in args])
        if not self._send(RequestType.UTILITY, self._encoder.encode(call)):
            self._check_alive()
        try:
            return await future
        finally:
            self._utility_calls.pop(call_id, None)

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise engine_dead(self.dead_reason)

    def _send(self, request_type: RequestType, payload: bytes) -> bool:
        """Send one message; False (and the engine marked dead) when it cannot be delivered."""
        try:
            self._send_socket.send_multipart([self._engine_identity, request_type.value, payload],
                                             flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: the engine's socket is gone
            self._mark_dead(f"cannot reach the engine core ({e})")
            return False

    # ---------------------------------------------------------------- background tasks

    async def _output_loop(self) -> None:
        decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        try:
            while True:
                frame = await self._output.recv(copy=False)
                outputs = decoder.decode(frame.buffer)
                if outputs.scheduler_stats is not None:  # a step's outputs (not a utility answer)
                    iteration = IterationStats(time.time())
                    to_abort = self.processor.process(outputs.outputs, iteration)
                    if to_abort:
                        self._send(RequestType.ABORT, self._encoder.encode(to_abort))
                    self._record_stats(outputs.scheduler_stats, iteration)
                if outputs.utility_output is not None:
                    self._resolve_utility(outputs)
                if outputs.engine_dead is not None:
                    logger.error("engine core died:\n%s", outputs.engine_dead)
                    self._mark_dead(outputs.engine_dead.splitlines()[0])
                    return
        except Exception as e:
            # Without this loop no request can ever finish: fail them all loudly instead.
            logger.exception("processing engine outputs failed")
            self._mark_dead(f"processing engine outputs failed ({type(e).__name__}: {e})")

    def _record_stats(self, scheduler_stats: SchedulerStats | None, iteration: IterationStats) -> None:
        for stat_logger in self.stat_loggers:
            stat_logger.record(scheduler_stats, iteration)

    def _resolve_utility(self, outputs: EngineCoreOutputs) -> None:
        result = outputs.utility_output
        assert result is not None
        future = self._utility_calls.get(result.call_id)
        if future is None or future.done():
            return
        if result.error is not None:
            future.set_exception(APIError(500, f"engine utility call failed: {result.error}"))
        else:
            future.set_result(result.result)

    async def _watch_process(self, exited: asyncio.Future[int]) -> None:
        code = await exited
        if not self._closing:
            logger.error("engine core process exited with code %d", code)
            self._mark_dead(f"the engine core process exited with code {code}")

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        self.fail_all(engine_failed(reason))
        self.dead.set()

    def fail_all(self, error: APIError) -> None:
        """End every request and utility call in flight with `error`; the engine's own
        copies, if it still runs, are dropped when it shuts down."""
        iteration = IterationStats(time.time())
        self.processor.fail_all(error, iteration)
        self._record_stats(None, iteration)
        for future in self._utility_calls.values():
            if not future.done():
                future.set_exception(error)

    # ---------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Stop the engine (closing its stdin is its cue; it is killed if it does not go in
        time) and release the sockets. Safe whether or not `start` got anywhere."""
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), _SHUTDOWN_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("engine core did not stop within %.0f s; killing it", _SHUTDOWN_TIMEOUT_S)
                proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
