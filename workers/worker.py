"""Worker: one device's model, KV cache and model runner."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import torch
from transformers import GenerationConfig

from engine_core.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig
from workers.model_loader import load_hf_config, load_model, resolve_dtype
from workers.model_runner import ModelRunner
from workers.model_source import resolve_model

logger = logging.getLogger(__name__)


class ModelInfo(msgspec.Struct):
    """What the engine core needs to know about the loaded model and its KV cache."""

    model_path: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    num_kv_blocks: int
    device: str
    dtype: str


def _eos_token_ids(model_dir: Path, hf_config) -> list[int]:
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    if eos is None:
        eos = hf_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device must be 'cpu' or 'auto' on a machine without CUDA, got 'cuda'")
    return torch.device(name)


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _device(config.device)
        self.model_dir = resolve_model(config.model)
        hf_config = load_hf_config(self.model_dir)
        text_config = hf_config.get_text_config()
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        torch.manual_seed(config.seed)

        self.model = load_model(self.model_dir, self.dtype, self.device)
        # Attention is always full: past a sliding window the model would differ from its
        # reference, so the window bounds the context like max_position_embeddings does.
        model_max_len = min(x for x in (getattr(text_config, "max_position_embeddings", None),
                                        self.model.sliding_window) if x)
        if config.max_model_len is not None and config.max_model_len > model_max_len:
            raise ValueError(f"max_model_len must be <= {model_max_len} (the model's "
                             f"maximum context), got {config.max_model_len}")
        self.max_model_len = config.max_model_len or model_max_len

        self.num_layers = len(self.model.attention_layers())
        attn = self.model.attention_layers()[0]
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.num_kv_blocks = self._num_kv_blocks()
        shape = (2, self.num_kv_blocks, config.block_size, self.num_kv_heads, self.head_dim)
        kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.vocab_size = int(text_config.vocab_size)
        self.eos_token_ids = _eos_token_ids(self.model_dir, text_config)
        self.model_runner = ModelRunner(self.model, kv_caches, config.block_size, config.max_num_seqs,
                                        self.max_model_len, self.vocab_size, self.eos_token_ids,
                                        self.device, use_cuda_graphs=not config.enforce_eager)

    def _block_bytes(self) -> int:
        element_size = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.config.block_size * self.num_kv_heads * self.head_dim * element_size

    def _num_kv_blocks(self) -> int:
        config = self.config
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._profile_free_gpu_memory()
        else:
            budget = DEFAULT_CPU_KV_CACHE_MEMORY
        num_blocks = budget // self._block_bytes()
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget of {budget} bytes holds no block of "
                             f"{self._block_bytes()} bytes; give more memory")
        return int(num_blocks)

    def _profile_free_gpu_memory(self) -> int:
        """gpu_memory_utilization of the GPU, minus weights and the peak activations of a
        forward over a full token budget (vLLM's rule)."""
        from workers.profiling import peak_forward_memory

        total = torch.cuda.get_device_properties(self.device).total_memory
        peak = peak_forward_memory(self.model, self.config.max_num_batched_tokens, self.device)
        return int(total * self.config.gpu_memory_utilization) - peak

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_path=str(self.model_dir),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            num_kv_blocks=self.num_kv_blocks,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )
