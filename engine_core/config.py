"""EngineConfig: the one source of truth for engine arguments.

The CLI builds it from flags, `LLM` from keyword arguments, and the engine-core process gets
it at start-up (msgpack-encoded, like every other message). Fields that depend on the model
(`max_model_len` when not given) are resolved by the engine once the model is loaded.
"""

from __future__ import annotations

import msgspec

from engine_core.protocol import check_arg

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
EXECUTOR_BACKENDS = ("uni", "mp")
# A process per rank: beyond the GPUs of any one host, and far beyond what a CPU can share.
MAX_TENSOR_PARALLEL_SIZE = 64
LOAD_FORMATS = ("auto", "dummy")
KV_CACHE_DTYPES = ("auto", "fp8")  # fp8: float8_e4m3fn with per-tensor scales (vLLM's flag)
# fp8 quantizes a 16-bit checkpoint's linear layers on the fly; the others name the method of a
# pre-quantized checkpoint (its config.json's quantization_config), which is used without the flag.
QUANTIZATIONS = ("fp8", "compressed-tensors", "awq", "gptq")
BLOCK_SIZES = (8, 16, 32, 64, 128)
# (max_num_seqs, max_num_batched_tokens) by device, when not given.
CPU_SCHEDULING_LIMITS = (128, 2048)
GPU_SCHEDULING_LIMITS = (256, 8192)
LARGE_GPU_SCHEDULING_LIMITS = (256, 16384)
LARGE_GPU_MEMORY = 70 << 30  # bytes: H100, H200, A100-80GB and up
# Far beyond any useful step, and small enough that the workers' per-request and per-token
# buffers (sized by these) are never a memory error instead of a clear one.
MAX_NUM_SEQS = 16384
MAX_BATCHED_TOKENS = 1 << 20
DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in float32


SPECULATIVE_METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16


class SpeculativeConfig(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """`--speculative-config`, with vLLM's keys. Drafts are proposed after each step and
    verified by the target model as extra query tokens of the next one."""

    method: str  # "ngram" (prompt lookup) or "draft_model" (a smaller model, same tokenizer)
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # ngram: the shortest suffix n-gram looked up
    prompt_lookup_max: int = 4  # ngram: the longest, tried first
    model: str | None = None  # draft_model: its checkpoint directory
    # Steps with more running requests than this propose no drafts: at large batches the
    # step is bound by compute rather than by reading the weights, and verifying drafts that
    # may be rejected costs more than it saves. None: always speculate.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_arg(self.method in SPECULATIVE_METHODS, "speculative_config.method", self.method,
                  f"one of {SPECULATIVE_METHODS}")
        check_arg(1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
                  "speculative_config.num_speculative_tokens", self.num_speculative_tokens,
                  f"in [1, {MAX_SPECULATIVE_TOKENS}]")
        check_arg(1 <= self.prompt_lookup_min, "speculative_config.prompt_lookup_min",
                  self.prompt_lookup_min, ">= 1")
        check_arg(self.prompt_lookup_min <= self.prompt_lookup_max, "speculative_config.prompt_lookup_max",
                  self.prompt_lookup_max, f">= prompt_lookup_min ({self.prompt_lookup_min})")
        if self.method == "draft_model":
            check_arg(bool(self.model), "speculative_config.model", self.model,
                      "the draft model's path with method 'draft_model'")
        if self.disable_by_batch_size is not None:
            check_arg(self.disable_by_batch_size >= 1, "speculative_config.disable_by_batch_size",
                      self.disable_by_batch_size, ">= 1")

    @staticmethod
    def parse(value: str | dict | SpeculativeConfig) -> SpeculativeConfig:
        """From vLLM's JSON (`--speculative-config`) or a dict (`LLM(speculative_config=...)`)."""
        if isinstance(value, SpeculativeConfig):
            return value
        try:
            if isinstance(value, str):
                return msgspec.json.decode(value, type=SpeculativeConfig)
            return msgspec.convert(value, SpeculativeConfig)
        except msgspec.ValidationError as e:
            raise ValueError(f"speculative_config: {e}") from None
        except msgspec.DecodeError as e:
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}: {e}") from None

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a request reserves past its scheduled tokens. The draft model writes its
        own KV for the tokens it proposes, up to k positions past the step's last token."""
        return self.num_speculative_tokens if self.method == "draft_model" else 0


class EngineConfig(msgspec.Struct, omit_defaults=True):
    model: str | None = None  # None: the embedded default model (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU, float32 on CPU
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    # None: chosen from the device by `scheduling_limits`.
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    kv_cache_memory: int | None = None  # bytes; None: gpu_memory_utilization on GPU, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    # How the workers run: "uni", one worker inside the engine-core process (TP=1 only); "mp",
    # one process per tensor-parallel rank. None: "uni" at TP=1, "mp" otherwise.
    distributed_executor_backend: str | None = None
    load_format: str = "auto"  # "dummy": random weights, no checkpoint read (benchmarks)
    enforce_eager: bool = False  # True: no CUDA graphs (GPU only; the CPU always runs eagerly)
    # Schedule step N+1 while the device runs step N. None: on for CUDA, off on the CPU (whose
    # cores run both, so overlap gains nothing there and a late stop costs a wasted decode).
    # Off with speculative decoding, whose drafts come from the tokens of the step before.
    async_scheduling: bool | None = None
    speculative_config: SpeculativeConfig | None = None
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8: e4m3, twice the tokens of 16 bits
    quantization: str | None = None  # None: the checkpoint's own (quantization_config), if any

    def __post_init__(self) -> None:
        check_arg(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        check_arg(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        check_arg(self.block_size in BLOCK_SIZES, "block_size", self.block_size,
                  f"{', '.join(map(str, BLOCK_SIZES[:-1]))} or {BLOCK_SIZES[-1]}")
        if self.max_num_batched_tokens is not None:
            check_arg(1 <= self.max_num_batched_tokens <= MAX_BATCHED_TOKENS, "max_num_batched_tokens",
                      self.max_num_batched_tokens, f"in [1, {MAX_BATCHED_TOKENS}]")
        if self.max_num_seqs is not None:
            check_arg(1 <= self.max_num_seqs <= MAX_NUM_SEQS, "max_num_seqs", self.max_num_seqs,
                      f"in [1, {MAX_NUM_SEQS}]")
        if self.max_model_len is not None:
            check_arg(self.max_model_len >= 1, "max_model_len", self.max_model_len, ">= 1")
        if self.kv_cache_memory is not None:
            check_arg(self.kv_cache_memory > 0, "kv_cache_memory", self.kv_cache_memory, "> 0 bytes")
        check_arg(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                  self.gpu_memory_utilization, "(0, 1]")
        check_arg(1 <= self.tensor_parallel_size <= MAX_TENSOR_PARALLEL_SIZE, "tensor_parallel_size",
                  self.tensor_parallel_size, f"in [1, {MAX_TENSOR_PARALLEL_SIZE}]")
        if self.distributed_executor_backend is not None:
            check_arg(self.distributed_executor_backend in EXECUTOR_BACKENDS, "distributed_executor_backend",
                      self.distributed_executor_backend, f"one of {EXECUTOR_BACKENDS}")
        check_arg(self.tensor_parallel_size == 1 or self.distributed_executor_backend != "uni",
                  "distributed_executor_backend", self.distributed_executor_backend,
                  f"'mp' or None with tensor_parallel_size {self.tensor_parallel_size}")
        check_arg(self.load_format in LOAD_FORMATS, "load_format", self.load_format, f"one of {LOAD_FORMATS}")
        check_arg(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
                  f"one of {KV_CACHE_DTYPES}")
        if self.quantization is not None:
            check_arg(self.quantization in QUANTIZATIONS, "quantization", self.quantization,
                      f"one of {QUANTIZATIONS} or None")
            # Octavo serves a GGUF file dequantized to 16 bits: its own quantization is gone.
            check_arg(not (self.model or "").endswith(".gguf"), "quantization", self.quantization,
                      "None with a GGUF file (a Hugging Face checkpoint directory for quantization)")
        if self.speculative_config is not None:
            check_arg(not self.async_scheduling, "async_scheduling", self.async_scheduling,
                      "off (None or False) with speculative decoding")

    def scheduling_limits(self, device_type: str, total_memory: int) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens): those given, or the device's defaults. A
        large GPU runs wide steps at little more cost than narrow ones, so wide is fast by
        default (256 requests, 16,384 tokens: 18% more output than 128 and 2,048 on the
        reference workload, H200); a CPU's step time grows with its width."""
        if device_type == "cpu":
            defaults = CPU_SCHEDULING_LIMITS
        elif total_memory >= LARGE_GPU_MEMORY:
            defaults = LARGE_GPU_SCHEDULING_LIMITS
        else:
            defaults = GPU_SCHEDULING_LIMITS
        return self.max_num_seqs or defaults[0], self.max_num_batched_tokens or defaults[1]

    @property
    def uses_worker_processes(self) -> bool:
        return (self.distributed_executor_backend or ("uni" if self.tensor_parallel_size == 1 else "mp")) == "mp"
