"""The server's lifetime: start the engine, serve the application (`frontend.app`) until a
stop signal, drain the requests in progress, shut down."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

from aiohttp import web

from engine_core.config import EngineConfig
from engine_core.protocol import EngineReady
from frontend.admission import AdmissionLimit
from frontend.app import build_app
from frontend.engine_client import EngineConfigError, EngineStartError
from frontend.engine_supervisor import EngineSupervisor, RestartPolicy
from frontend.errors import shutting_down
from frontend.server_state import ServerState
from frontend.tokenizer import ModelTokenizer, import_transformers
from frontend.tool_calling import ToolCallingConfig
from metrics.log_stats import DEFAULT_INTERVAL_S, LoggingStatLogger
from metrics.prometheus import PrometheusStatLogger

logger = logging.getLogger("octavo")

# After the drain, how long aiohttp waits for handlers to send what they have (requests still
# running were already ended with an error, so this is only their last write).
_HANDLER_SHUTDOWN_TIMEOUT_S = 5.0
_DRAIN_POLL_S = 0.05


@dataclass(frozen=True)
class ServerArgs:
    host: str
    port: int
    api_key: str | None
    served_model_names: list[str] | None
    max_waiting_requests: int  # admitted beyond max_num_seqs; past it, 503 (see AdmissionLimit)
    shutdown_timeout: float  # seconds requests in progress get after SIGTERM
    metrics_compat: str | None = None  # "vllm": /metrics also under vLLM's names
    restart_policy: RestartPolicy = RestartPolicy()
    request_timeout: float | None = None  # seconds; None: no deadline
    trust_request_chat_template: bool = False  # run a chat template sent in chat_template_kwargs
    chat_template: str | None = None  # --chat-template's text; None: the model's own
    tool_calling: ToolCallingConfig = ToolCallingConfig()


async def serve(config: EngineConfig, args: ServerArgs) -> int:
    """Run the server until SIGINT / SIGTERM (exit code 0, after draining) or until the
    engine dies more often than the restart policy allows (1)."""
    engine = EngineSupervisor(config, args.restart_policy)
    try:
        starting = asyncio.ensure_future(engine.start())
        await asyncio.to_thread(import_transformers)
        try:
            ready = await starting
        except EngineConfigError as e:
            logger.error("%s", e)
            return 2  # as for a bad flag: the command line is the user's to fix
        except EngineStartError as e:
            logger.error("%s", e)
            return 1
        tokenizer = ModelTokenizer(ready.model_path, args.chat_template)
        if args.tool_calling.enable_auto_tool_choice and "tools" not in (tokenizer.chat_template or
                                                                          tokenizer.hf.chat_template or ""):
            logger.warning("the chat template never reads `tools`, so the model will not see the functions it may "
                           "call; give a tool-aware one with --chat-template")
        names = args.served_model_names or [config.model or os.path.basename(ready.model_path.rstrip("/"))]
        # The engine core has logged the device, dtype and KV cache capacity.
        logger.info("serving %s as %s", ready.model_path, ", ".join(names))
        prometheus = PrometheusStatLogger(names[0], ready.max_model_len, _cache_config_info(config, ready),
                                          _num_speculative_tokens(config), args.metrics_compat)
        log_stats = LoggingStatLogger()
        engine.client.stat_loggers = [prometheus, log_stats]
        engine.on_restart = prometheus.engine_restarts.inc
        engine.supervise()
        admission = AdmissionLimit(ready.max_num_seqs + args.max_waiting_requests)
        state = ServerState(engine, tokenizer, ready, names, args.api_key, admission, args.request_timeout,
                            trust_request_chat_template=args.trust_request_chat_template,
                            tool_calling=args.tool_calling)
        runner = web.AppRunner(build_app(state, prometheus), handler_cancellation=True,
                               shutdown_timeout=_HANDLER_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, args.host, args.port).start()
            except OSError as e:
                logger.error("cannot listen on %s:%d: %s", args.host, args.port, e)
                return 1
            logger.info("listening on http://%s:%d (OpenAI API under /v1)", args.host, args.port)
            log_task = asyncio.create_task(_log_stats_periodically(log_stats), name="log-stats")
            try:
                return await _run_until_stopped(state, args.shutdown_timeout)
            finally:
                log_task.cancel()
        finally:
            await runner.cleanup()
    finally:
        await engine.shutdown()


def _cache_config_info(config: EngineConfig, ready: EngineReady) -> dict[str, str]:
    # Label names as vLLM's cache_config_info where they mean the same thing.
    return {"block_size": str(ready.block_size), "num_gpu_blocks": str(ready.num_kv_blocks),
            "kv_capacity_tokens": str(ready.kv_capacity_tokens), "cache_dtype": ready.dtype,
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "gpu_memory_utilization": str(config.gpu_memory_utilization), "device": ready.device}


def _num_speculative_tokens(config: EngineConfig) -> int:
    spec = config.speculative_config
    return 0 if spec is None else spec.num_speculative_tokens


async def _log_stats_periodically(log_stats: LoggingStatLogger) -> None:
    interval = float(os.environ.get("OCTAVO_LOG_STATS_INTERVAL", DEFAULT_INTERVAL_S))
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        log_stats.log()


async def _run_until_stopped(state: ServerState, shutdown_timeout: float) -> int:
    """Serve until a stop signal, then drain: admit nothing new (503, and /health 503 so load
    balancers stop sending), let running requests finish for up to `shutdown_timeout`
    seconds (a second signal cuts that short), end the rest with an error. Or, exit 1 at
    once when the engine cannot be kept running."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopped, gave_up = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(state.engine.gave_up.wait())
    await asyncio.wait({stopped, gave_up}, return_when=asyncio.FIRST_COMPLETED)
    if gave_up.done():
        stopped.cancel()
        return 1
    gave_up.cancel()
    state.draining.set()
    stop.clear()
    deadline = loop.time() + shutdown_timeout
    logger.info("shutting down: waiting up to %.0f s for %d requests in progress", shutdown_timeout,
                state.admission.admitted)
    while state.admission.admitted and loop.time() < deadline and not stop.is_set():
        await asyncio.sleep(_DRAIN_POLL_S)
    if state.admission.admitted:
        logger.warning("shutting down: ending %d requests still in progress", state.admission.admitted)
        state.client.fail_all(shutting_down("the request did not finish within the shutdown timeout"))
    return 0
