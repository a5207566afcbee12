"""The engine-core process: one busy loop stepping EngineCore, fed and drained by two I/O threads.

Started by the API process as `python -m engine_core.core_process INPUT_ADDR OUTPUT_ADDR` with
the msgspec-JSON-encoded EngineConfig as the first line of stdin. Stdin then stays open as a
lifeline: it reaches EOF when the API process closes it (orderly shutdown) or dies (so the
engine never outlives its frontend, even after a SIGKILL).

Sockets: a DEALER connected to the frontend's ROUTER carries requests in (and the EngineReady
handshake out); a PUSH connected to the frontend's PULL carries EngineCoreOutputs out. Socket
I/O and msgspec (de)serialization run in the two threads, so the busy loop only ever touches
Python objects through `queue.Queue`s and never blocks on a socket.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import sys
import threading
import traceback
from typing import Any

import msgspec
import zmq

from engine_core.config import EngineConfig
from engine_core.engine import EngineCore
from engine_core.protocol import (
    EngineCoreOutputs,
    EngineStartFailure,
    EngineCoreRequest,
    RequestType,
    UtilityOutput,
    UtilityRequest,
)

logger = logging.getLogger(__name__)

# EngineCore methods the frontend may call by name through a UtilityRequest.
UTILITY_METHODS = frozenset({"reset_prefix_cache", "get_kv_cache_stats"})

# Ctrl-C and SIGTERM reach the whole process group (a terminal, systemd, `timeout`), but the
# frontend decides when the engine stops: it drains first. The engine stops when its lifeline
# closes, which it turns into this signal to interrupt the busy loop.
STOP_SIGNAL = signal.SIGUSR1

# How long a dying engine waits for its last messages (the engine_dead notice) to leave.
_SEND_LINGER_MS = 2000

InputItem = tuple[RequestType, Any]


class EngineCoreProc:
    """Owns the EngineCore and the busy loop; the I/O threads own one socket each."""

    def __init__(self, engine: EngineCore, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
        self.engine = engine
        self.input_queue: queue.Queue[InputItem] = queue.Queue()
        self.output_queue: queue.Queue[EngineCoreOutputs | None] = queue.Queue()
        self.input_thread = threading.Thread(target=self._input_loop, args=(input_socket,),
                                             name="engine-input", daemon=True)
        self.output_thread = threading.Thread(target=self._output_loop, args=(output_socket,),
                                              name="engine-output", daemon=True)

    def start_threads(self) -> None:
        self.input_thread.start()
        self.output_thread.start()

    def run(self) -> None:
        while True:
            self._process_input_queue()
            if self.engine.has_unfinished_requests():
                # Sent even with no tokens (a prefill chunk, a pipelined step that only
                # launched work): its stats' counters were drained and are reported only here.
                self.output_queue.put_nowait(self.engine.step())

    def _process_input_queue(self) -> None:
        # Idle: sleep on the queue instead of spinning. Busy: take only what is already there.
        if not self.engine.has_unfinished_requests():
            self._handle(*self.input_queue.get())
        while True:
            try:
                item = self.input_queue.get_nowait()
            except queue.Empty:
                return
            self._handle(*item)

    def _handle(self, request_type: RequestType, payload: Any) -> None:
        if request_type is RequestType.ADD:
            self.engine.add_request(payload)
        elif request_type is RequestType.ABORT:
            self.engine.abort_requests(payload)
            if not self.engine.has_unfinished_requests():
                # No step follows to report it: tell the frontend the batch and KV cache emptied.
                self.output_queue.put_nowait(self.engine.make_outputs([]))
        else:
            self.output_queue.put_nowait(EngineCoreOutputs(utility_output=self._call_utility(payload)))

    def _call_utility(self, call: UtilityRequest) -> UtilityOutput:
        if call.method not in UTILITY_METHODS:
            return UtilityOutput(call.call_id, error=f"unknown utility method {call.method!r}")
        try:
            args = [msgspec.msgpack.decode(arg) for arg in call.args]
            # to_builtins here, not in the output thread: a result that cannot be encoded
            # must fail this call, not the thread every output goes through.
            return UtilityOutput(call.call_id, result=msgspec.to_builtins(getattr(self.engine, call.method)(*args)))
        except Exception as e:  # a failed RPC is the caller's error, not the engine's death
            logger.exception("utility call %s failed", call.method)
            return UtilityOutput(call.call_id, error=f"{type(e).__name__}: {e}")

    def _input_loop(self, sock: zmq.Socket) -> None:
        add_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        abort_decoder = msgspec.msgpack.Decoder(list[str])
        utility_decoder = msgspec.msgpack.Decoder(UtilityRequest)
        decoders = {RequestType.ADD: add_decoder, RequestType.ABORT: abort_decoder,
                    RequestType.UTILITY: utility_decoder}
        try:
            while True:
                type_frame, payload = sock.recv_multipart(copy=False)
                try:
                    request_type = RequestType(type_frame.bytes)
                    self.input_queue.put_nowait((request_type, decoders[request_type].decode(payload.buffer)))
                except (ValueError, msgspec.DecodeError):
                    # Only our own frontend talks to this socket: a bad frame is a bug there,
                    # and dropping it keeps every other request alive.
                    logger.exception("dropping an undecodable message from the frontend")
        except zmq.ContextTerminated:
            sock.close(linger=0)

    def _output_loop(self, sock: zmq.Socket) -> None:
        encoder = msgspec.msgpack.Encoder()
        while (outputs := self.output_queue.get()) is not None:
            sock.send(encoder.encode(outputs), copy=False)
        sock.close(linger=_SEND_LINGER_MS)

    def stop_output(self, last: EngineCoreOutputs | None = None) -> None:
        """Send `last` (if any) after everything queued, then close the output socket."""
        if last is not None:
            self.output_queue.put_nowait(last)
        self.output_queue.put_nowait(None)
        if self.output_thread.is_alive():
            self.output_thread.join(timeout=_SEND_LINGER_MS / 1000 + 1)


def _watch_lifeline(fd: int, ipc_dir: str) -> None:
    # Raw reads: a thread blocked inside sys.stdin's buffered reader holds its lock, and the
    # interpreter aborts when it cannot take that lock at exit.
    while os.read(fd, 4096):
        pass  # EOF: the frontend closed the pipe or exited
    # The socket directory serves this engine alone (a restarted engine gets a new one), so
    # nobody needs it now; removing it here covers a frontend killed before it could.
    shutil.rmtree(ipc_dir, ignore_errors=True)
    os.kill(os.getpid(), STOP_SIGNAL)


def _raise_system_exit(signum: int, frame: Any) -> None:
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)  # once: a second SystemExit during shutdown is noise
    raise SystemExit(0)


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> int:
    """Run until told to stop (0) or until a fatal error (1), announced as engine_dead; 2 when
    the engine cannot start with this configuration (EngineStartFailure)."""
    ctx = zmq.Context()
    input_socket = ctx.socket(zmq.DEALER)
    input_socket.connect(input_addr)
    output_socket = ctx.socket(zmq.PUSH)
    output_socket.setsockopt(zmq.SNDHWM, 0)  # never block the output thread on a slow frontend
    output_socket.connect(output_addr)
    proc: EngineCoreProc | None = None
    try:
        try:
            engine = EngineCore(config)
        except ValueError as e:
            # The configuration or the model is wrong (the message names the value): the
            # user's to fix, said in one line by the frontend; a traceback helps only us.
            logger.debug("the engine cannot start", exc_info=True)
            input_socket.send(msgspec.msgpack.encode(EngineStartFailure(str(e))))
            input_socket.close(linger=_SEND_LINGER_MS)
            return 2
        proc = EngineCoreProc(engine, input_socket, output_socket)
        # A stop signal between the two thread starts would leave a socket that nobody
        # closes, and ctx.term() below waiting for it forever: start both or neither.
        signal.pthread_sigmask(signal.SIG_BLOCK, {STOP_SIGNAL})
        input_socket.send(msgspec.msgpack.encode(engine.ready))
        proc.start_threads()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {STOP_SIGNAL})
        proc.run()
    except SystemExit:
        logger.info("engine core shutting down")
        if proc is not None:
            try:
                proc.engine.shutdown()
            except Exception:  # the signal may have landed mid-step; exiting matters more
                logger.exception("engine shutdown failed")
            proc.stop_output()
        return 0
    except BaseException as e:
        logger.exception("engine core died")
        if proc is None:
            return 1  # never ready: the frontend sees the process exit during the handshake
        proc.stop_output(EngineCoreOutputs(engine_dead=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return 1
    finally:
        # Each running I/O thread closes its own socket (ctx.term() wakes the input thread's
        # recv); the sockets of threads that never ran are closed here.
        if proc is None or not proc.input_thread.is_alive():
            input_socket.close(linger=0)
        if proc is None or not proc.output_thread.is_alive():
            output_socket.close(linger=0)
        ctx.term()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine_core: %(message)s")
    input_addr, output_addr = sys.argv[1], sys.argv[2]
    config = msgspec.json.decode(sys.stdin.buffer.readline(), type=EngineConfig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, _raise_system_exit)
    ipc_dir = os.path.dirname(input_addr.removeprefix("ipc://"))
    threading.Thread(target=_watch_lifeline, args=(sys.stdin.fileno(), ipc_dir), name="lifeline", daemon=True).start()
    sys.exit(run_engine_core(config, input_addr, output_addr))


if __name__ == "__main__":
    main()
