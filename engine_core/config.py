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
DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30  # 1 GiB: ~23k tokens of SmolLM2-135M in float32


class SpeculativeConfig(msgspec.Struct, omit_defaults=True):
    method: str  # "ngram" or "draft_model"
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None


class EngineConfig(msgspec.Struct, omit_defaults=True):
    model: str | None = None  # None: the embedded default model (SmolLM2-135M-Instruct)
    dtype: str = "auto"  # auto: the checkpoint's dtype on GPU, float32 on CPU
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    kv_cache_memory: int | None = None  # bytes; None: gpu_memory_utilization on GPU, 1 GiB on CPU
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    enforce_eager: bool = False  # True: no CUDA graphs (GPU only; the CPU always runs eagerly)
    # Schedule step N+1 while the device runs step N. None: on for CUDA, off on the CPU (whose
    # cores run both, so overlap gains nothing there and a late stop costs a wasted decode).
    async_scheduling: bool | None = None
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        check_arg(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        check_arg(self.device in DEVICES, "device", self.device, f"one of {DEVICES}")
        check_arg(self.block_size in (8, 16, 32, 64, 128), "block_size", self.block_size, "8, 16, 32, 64 or 128")
        check_arg(self.max_num_batched_tokens >= 1, "max_num_batched_tokens", self.max_num_batched_tokens, ">= 1")
        check_arg(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, ">= 1")
        if self.max_model_len is not None:
            check_arg(self.max_model_len >= 1, "max_model_len", self.max_model_len, ">= 1")
        if self.kv_cache_memory is not None:
            check_arg(self.kv_cache_memory > 0, "kv_cache_memory", self.kv_cache_memory, "> 0 bytes")
        check_arg(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               self.gpu_memory_utilization, "(0, 1]")
        check_arg(self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size, ">= 1")
