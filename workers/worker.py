"""Worker: one device's model, KV cache and model runner."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from engine_core.config import DEFAULT_CPU_KV_CACHE_MEMORY, EngineConfig, SpeculativeConfig
from engine_core.protocol import ModelInfo, ModelRunnerOutput, SchedulerOutput
from workers.distributed import init_tensor_parallel
from workers.draft_model_proposer import DraftModelProposer
from workers.input_batch import InputBatch
from workers.model_loader import load_hf_config, load_model, resolve_dtype
from workers.model_runner import ModelRunner
from workers.model_source import resolve_model
from workers.ngram_proposer import NgramProposer
from workers.quantization.kv_cache import kv_cache_dtype
from workers.spec_decode import DraftProposer

logger = logging.getLogger(__name__)


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


def _device(name: str, rank: int, world_size: int) -> torch.device:
    """Rank r's device: cuda:r (one GPU per rank), or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device must be 'cpu' or 'auto' on a machine without CUDA, got 'cuda'")
    if world_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size must be <= the {torch.cuda.device_count()} CUDA device(s) "
                         f"here, got {world_size}")
    return torch.device("cuda", rank)


class Worker:
    """Loads the model and its KV cache onto one device and runs the engine core's steps there."""

    def __init__(self, config: EngineConfig, rank: int = 0, init_method: str | None = None) -> None:
        """`rank` and `init_method` (torch.distributed's rendezvous) place a worker process
        among the config's tensor_parallel_size ranks; each loads only its shards."""
        self.config = config
        world_size = config.tensor_parallel_size
        self.device = _device(config.device, rank, world_size)
        self.max_num_seqs, self.max_num_batched_tokens = self._scheduling_limits(rank)
        self.model_dir = resolve_model(config.model)
        hf_config = load_hf_config(self.model_dir)
        text_config = hf_config.get_text_config()
        self.dtype = resolve_dtype(config.dtype, hf_config, self.device)
        self.kv_cache_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype, self.device)
        # Every rank draws the same random numbers (sampling keys, dummy weights), so all
        # sample the same tokens from the same gathered logits.
        torch.manual_seed(config.seed)
        if world_size > 1 and self.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores
        self.tp_group = init_tensor_parallel(rank, world_size, init_method, self.device)

        self.model = load_model(self.model_dir, self.dtype, self.device, self.tp_group,
                                dummy=config.load_format == "dummy", quantization=config.quantization)
        # Attention is always full: past a sliding window the model would differ from its
        # reference, so the window bounds the context like max_position_embeddings does.
        model_max_len = min(x for x in (getattr(text_config, "max_position_embeddings", None),
                                        self.model.sliding_window) if x)
        if config.max_model_len is not None and config.max_model_len > model_max_len:
            raise ValueError(f"max_model_len must be <= {model_max_len} (the model's "
                             f"maximum context), got {config.max_model_len}")
        self.max_model_len = config.max_model_len or model_max_len

        self.vocab_size = int(text_config.vocab_size)
        spec = config.speculative_config
        self.draft_model = self._load_draft_model(spec) if spec and spec.method == "draft_model" else None
        # The draft model's KV blocks are the target's block ids in tensors of its own.
        self.kv_models = [self.model] + ([self.draft_model] if self.draft_model is not None else [])
        self.num_kv_blocks = self._num_kv_blocks()
        if rank == 0 and self.kv_cache_dtype != self.dtype:
            ratio = self.dtype.itemsize / self.kv_cache_dtype.itemsize
            logger.info("KV cache in %s: %d tokens, %gx what %s would hold in the same memory",
                        str(self.kv_cache_dtype).removeprefix("torch."),
                        self.num_kv_blocks * config.block_size, ratio, str(self.dtype).removeprefix("torch."))
        kv_caches = [self._allocate_kv_caches(model) for model in self.kv_models]
        self.eos_token_ids = _eos_token_ids(self.model_dir, text_config)
        self.model_runner = ModelRunner(self.model, kv_caches[0], config.block_size, self.max_num_seqs,
                                        self.max_num_batched_tokens, self.max_model_len, self.vocab_size, self.eos_token_ids,
                                        self.device, use_cuda_graphs=not config.enforce_eager,
                                        num_speculative_tokens=spec.num_speculative_tokens if spec else 0,
                                        make_proposer=self._proposer_factory(spec, kv_caches[-1]))

    def _scheduling_limits(self, rank: int) -> tuple[int, int]:
        config = self.config
        total_memory = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0
        limits = config.scheduling_limits(self.device.type, total_memory)
        if rank == 0 and (config.max_num_seqs is None or config.max_num_batched_tokens is None):
            logger.info("max_num_seqs %d and max_num_batched_tokens %d, chosen for %s%s (--max-num-seqs and "
                        "--max-num-batched-tokens set them)", *limits, self.device.type,
                        f" with {total_memory / (1 << 30):.0f} GiB" if total_memory else "")
        return limits

    def _load_draft_model(self, spec: SpeculativeConfig) -> torch.nn.Module:
        draft_dir = resolve_model(spec.model)
        draft_config = load_hf_config(draft_dir).get_text_config()
        if draft_config.vocab_size > self.vocab_size:
            raise ValueError(f"the draft model's vocab_size must be <= the target's ({self.vocab_size}): "
                             f"it must share its tokenizer, got {draft_config.vocab_size}")
        draft_max_len = getattr(draft_config, "max_position_embeddings", None)
        if draft_max_len is not None and draft_max_len < self.max_model_len:
            raise ValueError(f"the draft model's max_position_embeddings must be >= max_model_len "
                             f"({self.max_model_len}), got {draft_max_len}")
        return load_model(draft_dir, self.dtype, self.device)

    def _proposer_factory(self, spec: SpeculativeConfig | None, draft_kv_caches: list[torch.Tensor]
                          ) -> Callable[[InputBatch], DraftProposer] | None:
        if spec is None:
            return None
        if spec.method == "ngram":
            return lambda batch: NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max,
                                               spec.num_speculative_tokens)
        return lambda batch: DraftModelProposer(self.draft_model, draft_kv_caches, batch, self.config.block_size,
                                                self.max_num_batched_tokens, spec.num_speculative_tokens,
                                                self.device,
                                                use_cuda_graphs=not self.config.enforce_eager)

    def _allocate_kv_caches(self, model: torch.nn.Module) -> list[torch.Tensor]:
        layers = model.attention_layers()
        shape = (2, self.num_kv_blocks, self.config.block_size, layers[0].num_kv_heads, layers[0].head_dim)
        return [torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device) for _ in layers]

    def _block_bytes(self) -> int:
        element_size = self.kv_cache_dtype.itemsize
        return sum(2 * len(layers) * self.config.block_size * layers[0].num_kv_heads * layers[0].head_dim
                   * element_size for layers in (model.attention_layers() for model in self.kv_models))

    def _num_kv_blocks(self) -> int:
        config = self.config
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._profile_free_gpu_memory()
        else:
            budget = DEFAULT_CPU_KV_CACHE_MEMORY
        # Ranks hold equal shards but may have unequal free memory: all take the smallest.
        num_blocks = self.tp_group.min(budget // self._block_bytes())
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget of {budget} bytes holds no block of "
                             f"{self._block_bytes()} bytes; give more memory")
        return int(num_blocks)

    def _profile_free_gpu_memory(self) -> int:
        """gpu_memory_utilization of the GPU, minus weights and the peak activations of a
        forward over a full token budget (vLLM's rule)."""
        from workers.profiling import peak_forward_memory

        total = torch.cuda.get_device_properties(self.device).total_memory
        peak = peak_forward_memory(self.model, self.max_num_batched_tokens, self.device)
        return int(total * self.config.gpu_memory_utilization) - peak

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_path=str(self.model_dir),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            num_kv_blocks=self.num_kv_blocks,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
        )

    def launch(self, scheduler_output: SchedulerOutput) -> None:
        self.model_runner.launch(scheduler_output)

    def sample_under_grammar(self, grammar_bitmask: np.ndarray) -> None:
        self.model_runner.sample_under_grammar(grammar_bitmask)

    def collect(self) -> ModelRunnerOutput:
        return self.model_runner.collect()

    def reset(self) -> None:
        """Drop every request and step in flight, after a step failed."""
        self.model_runner.reset()
