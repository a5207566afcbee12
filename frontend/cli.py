"""The `octavo` command: `octavo serve [MODEL] [flags]`, with vllm serve's flag names."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine_core.config import (
    BLOCK_SIZES,
    CPU_SCHEDULING_LIMITS,
    DEVICES,
    DTYPES,
    EXECUTOR_BACKENDS,
    GPU_SCHEDULING_LIMITS,
    KV_CACHE_DTYPES,
    LARGE_GPU_SCHEDULING_LIMITS,
    LOAD_FORMATS,
    QUANTIZATIONS,
    EngineConfig,
    SpeculativeConfig,
)
from frontend.engine_supervisor import RestartPolicy
from frontend.tool_calling import ToolCallingConfig
from frontend.tool_parsers import TOOL_PARSERS
from frontend.version import octavo_version

# Enough for bursts; bounded so that overload answers 503 instead of queueing without end.
DEFAULT_MAX_WAITING_REQUESTS = 1024
# After SIGTERM, how long requests in progress may take to finish: under Kubernetes' default
# 30 s grace period, so they end with our error rather than a SIGKILL.
DEFAULT_SHUTDOWN_TIMEOUT_S = 25.0
# Our ChatML template that renders tools in the Hermes format, for --chat-template.
TOOL_CHAT_TEMPLATE_HERMES = os.path.join(os.path.dirname(__file__), "chat_templates", "tool_chat_template_hermes.jinja")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """A memory size: plain bytes, or with a unit (512MiB, 2GiB, 1.5GB; k/m/g/t)."""
    found = _SIZE.match(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (say e.g. 2GiB or 2147483648)")
    number, unit, binary = found.groups()
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base ** " kmgt".index(unit.lower() or " "))


def _number(text: str, kind: type[int] | type[float], what: str, ok: Callable[[float], bool], allowed: str) -> Any:
    """A flag's number, or an argparse error naming the value and the allowed range."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    return _number(text, int, "an integer", lambda v: v >= 0, ">= 0")


def _positive_seconds(text: str) -> float:
    return _number(text, float, "a number of seconds", lambda v: math.isfinite(v) and v > 0,
                   "a finite number of seconds > 0")


def _port(text: str) -> int:
    return _number(text, int, "a port number", lambda v: 1 <= v <= 65535, "in [1, 65535]")


def check_model_path(model: str | None) -> str | None:
    """What is wrong with MODEL as a local path, found in microseconds rather than after the
    engine has started (None: nothing, or a Hugging Face id for the engine to look up)."""
    if model is None:
        return None
    path = os.path.expanduser(model)
    if not os.path.exists(path):
        # "org/name" is a Hugging Face id; anything that spells a path must exist.
        if path.startswith(("/", "./", "../", "~")) or path in (".", ".."):
            return f"model {model!r}: no such file or directory"
        return None
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            return f"model {model!r}: the directory has no config.json (a Hugging Face checkpoint has one)"
        return None
    if not path.endswith(".gguf"):
        return f"model {model!r}: a file must be a .gguf; give a checkpoint directory otherwise"
    return None


def check_port_free(host: str, port: int) -> str | None:
    """Whether we could listen on host:port, checked before the model loads (seconds to minutes)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp's listener does
        try:
            probe.bind((host, port))
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


@dataclass(frozen=True)
class EngineFlag:
    """An `octavo serve` flag that sets the EngineConfig field of the same name (vLLM's flag
    name); its default is the field's, and a bool field gets --FLAG / --no-FLAG."""

    field: str
    help: str
    type: Callable[[str], Any] | None = None  # None: the text as given
    choices: tuple[Any, ...] | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def name(self) -> str:
        return "--" + self.field.replace("_", "-")


# Every EngineConfig field `octavo serve` sets, in --help's order; `engine_config` reads them all.
ENGINE_FLAGS = (
    EngineFlag("max_model_len", "context length: prompt plus completion tokens (default: the model's)", int),
    EngineFlag("max_num_seqs", "most requests running in one step (default: from the device: "
               f"{LARGE_GPU_SCHEDULING_LIMITS[0]} on a GPU, {CPU_SCHEDULING_LIMITS[0]} on the CPU)", int),
    EngineFlag("max_num_batched_tokens", "token budget of one step: prefill chunks plus decodes (default: from "
               f"the device: {LARGE_GPU_SCHEDULING_LIMITS[1]} on a GPU of 70 GiB or more, "
               f"{GPU_SCHEDULING_LIMITS[1]} on a smaller one, {CPU_SCHEDULING_LIMITS[1]} on the CPU)", int),
    EngineFlag("block_size", "tokens per KV cache block (default: %(default)s)", int, choices=BLOCK_SIZES),
    EngineFlag("dtype", "weights and activations; auto: the checkpoint's on GPU, float32 on CPU "
               "(default: %(default)s)", choices=DTYPES),
    EngineFlag("device", "where to run; auto: CUDA if available (default: %(default)s)", choices=DEVICES),
    EngineFlag("gpu_memory_utilization", "fraction of GPU memory for weights, activations and KV cache "
               "(default: %(default)s)", float),
    EngineFlag("kv_cache_memory", "KV cache size, e.g. 2GiB (default: from --gpu-memory-utilization on GPU, "
               "1 GiB on CPU)", parse_bytes),
    EngineFlag("enable_prefix_caching", "reuse the KV cache of shared prompt prefixes (default: on)"),
    EngineFlag("seed", "random seed of the engine (default: %(default)s)", int),
    EngineFlag("tensor_parallel_size", "GPUs (or, on the CPU, processes) to shard the model over, one worker "
               "process each (default: %(default)s)", int, aliases=("-tp",)),
    EngineFlag("distributed_executor_backend", "uni: the worker inside the engine-core process (tensor "
               "parallel size 1 only); mp: one worker process per rank (default: uni at size 1, mp above)",
               choices=EXECUTOR_BACKENDS),
    EngineFlag("load_format", "dummy: random weights and no checkpoint read, to benchmark a model shape from "
               "its config.json alone (default: %(default)s)", choices=LOAD_FORMATS),
    EngineFlag("kv_cache_dtype", "fp8: the KV cache in float8 e4m3 with per-tensor scales (the checkpoint's "
               "k_scale/v_scale, else 1.0), twice the tokens; auto: the model's dtype (default: %(default)s)",
               choices=KV_CACHE_DTYPES),
    EngineFlag("quantization", "fp8: quantize the linear layers' weights to float8 e4m3 on load (per-channel "
               "scales, dynamic per-token activation scales); a pre-quantized checkpoint (fp8, "
               "compressed-tensors, awq, gptq) is detected from its config.json without it "
               "(default: none)", choices=QUANTIZATIONS),
    # JSON here; engine_config parses it, so that a bad one reads like any other bad value.
    EngineFlag("speculative_config", 'speculative decoding, as vLLM\'s: {"method": "ngram", '
               '"num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 4} or '
               '{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}; optional '
               '"disable_by_batch_size": N', metavar="JSON"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="octavo", description="Octavo: an OpenAI-compatible LLM server.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {octavo_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve a model over the OpenAI API",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health, /tokenize, /detokenize, /version).")
    serve.set_defaults(command_parser=serve)  # argument errors print `octavo serve`'s usage
    serve.add_argument("model", nargs="?", default=None,
                       help="a Hugging Face checkpoint directory, a GGUF file, or a model id in the local Hugging "
                            "Face cache; none: the embedded default, SmolLM2-135M-Instruct")
    _add_server_flags(serve)
    _add_chat_flags(serve)
    _add_lifetime_flags(serve)
    _add_engine_flags(serve)
    return parser


def _add_server_flags(serve: argparse.ArgumentParser) -> None:
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    server.add_argument("--port", type=_port, default=8000, help="port to listen on (default: %(default)s)")
    server.add_argument("--api-key", default=os.environ.get("OCTAVO_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every path but /health, /metrics and /version "
                             "(default: $OCTAVO_API_KEY; none: open)")
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the model name(s) clients use; the first is reported in responses "
                             "(default: MODEL, or the default model's name)")
    server.add_argument("--metrics-compat", choices=("vllm",), default=None,
                        help="vllm: /metrics also exports every metric under vLLM's names (vllm:...), for "
                             "existing vLLM dashboards and autoscalers (default: octavo:... only)")
    server.add_argument("--max-waiting-requests", type=_non_negative_int, default=DEFAULT_MAX_WAITING_REQUESTS,
                        metavar="N", help="requests admitted beyond --max-num-seqs (waiting for the engine); past "
                        "it new requests get 503 with Retry-After at once (default: %(default)s)")
    server.add_argument("--trust-request-chat-template", action="store_true",
                        help="render a chat template sent in a request's chat_template_kwargs; it is code the server "
                             "runs, so only where every client is trusted (default: refused with 400)")


def _add_chat_flags(serve: argparse.ArgumentParser) -> None:
    chat = serve.add_argument_group("chat templates and tool calling")
    chat.add_argument("--chat-template", default=None, metavar="PATH_OR_TEMPLATE",
                      help="a Jinja chat template (a file, or the template itself) in place of the model's; e.g. "
                           f"{TOOL_CHAT_TEMPLATE_HERMES}, which renders tools for --tool-call-parser hermes "
                           "(default: the model's own)")
    chat.add_argument("--enable-auto-tool-choice", action="store_true",
                      help='serve tool_choice "auto": the model decides whether to call a tool, and its calls are '
                           "parsed from its output by --tool-call-parser (default: tool_choice \"auto\" is refused "
                           "with 400)")
    chat.add_argument("--tool-call-parser", choices=tuple(TOOL_PARSERS), default=None,
                      help="the format of the model's tool calls: hermes (<tool_call> JSON: Qwen2.5, Qwen3, "
                           "SmolLM2, Hermes), llama3_json (Llama 3.x), mistral ([TOOL_CALLS])")


def load_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the value itself where it is a template."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and not a Jinja template")


def tool_calling_config(args: argparse.Namespace) -> ToolCallingConfig:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser: say which format the model's "
                         f"calls are in ({', '.join(TOOL_PARSERS)})")
    return ToolCallingConfig(args.enable_auto_tool_choice, args.tool_call_parser)


def _add_lifetime_flags(serve: argparse.ArgumentParser) -> None:
    lifetime = serve.add_argument_group("lifetime")
    lifetime.add_argument("--shutdown-timeout", type=_positive_seconds, default=DEFAULT_SHUTDOWN_TIMEOUT_S,
                          metavar="SECONDS", help="after SIGTERM / SIGINT, how long requests in progress may take "
                          "to finish; new ones get 503 meanwhile (default: %(default)s)")
    lifetime.add_argument("--request-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                          help="end a request that runs longer than this with a 408 error, freeing its KV cache; "
                          "a request's own `request_timeout` field overrides it (default: none)")
    lifetime.add_argument("--max-engine-restarts", type=_non_negative_int, default=RestartPolicy.max_restarts,
                          metavar="N", help="start a new engine core when it dies, unless it died more than N times "
                          "within --engine-restart-window; then exit 1 (default: %(default)s; 0: never restart)")
    lifetime.add_argument("--engine-restart-window", type=_positive_seconds, default=RestartPolicy.window_s,
                          metavar="SECONDS", help="the window of --max-engine-restarts (default: %(default)s)")


def _add_engine_flags(serve: argparse.ArgumentParser) -> None:
    engine = serve.add_argument_group("engine")
    defaults = EngineConfig()
    for flag in ENGINE_FLAGS:
        default = getattr(defaults, flag.field)
        if isinstance(default, bool):
            engine.add_argument(flag.name, *flag.aliases, action=argparse.BooleanOptionalAction,
                                default=default, help=flag.help)
        else:
            engine.add_argument(flag.name, *flag.aliases, type=flag.type, choices=flag.choices,
                                default=default, metavar=flag.metavar, help=flag.help)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig the flags spell; ValueError names a bad value."""
    values = {flag.field: getattr(args, flag.field) for flag in ENGINE_FLAGS}
    spec = values["speculative_config"]
    values["speculative_config"] = SpeculativeConfig.parse(spec) if spec else None
    return EngineConfig(model=args.model, **values)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = engine_config(args)
        tool_calling = tool_calling_config(args)
        chat_template = None if args.chat_template is None else load_chat_template(args.chat_template)
    except (ValueError, OSError) as e:
        args.command_parser.error(str(e))
    problem = check_model_path(args.model) or check_port_free(args.host, args.port)
    if problem is not None:
        args.command_parser.error(problem)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    from frontend.api_server import ServerArgs, serve  # heavy (transformers): after argument errors

    return uvloop.run(serve(config, ServerArgs(
        args.host, args.port, args.api_key, args.served_model_name, max_waiting_requests=args.max_waiting_requests,
        metrics_compat=args.metrics_compat, shutdown_timeout=args.shutdown_timeout,
        request_timeout=args.request_timeout, trust_request_chat_template=args.trust_request_chat_template,
        chat_template=chat_template, tool_calling=tool_calling,
        restart_policy=RestartPolicy(args.max_engine_restarts, args.engine_restart_window))))


if __name__ == "__main__":
    sys.exit(main())
