"""Load a Hugging Face style checkpoint directory (config.json + safetensors) into Octavo's
own model classes.

Checkpoint tensors are matched to parameters by name; the parallel layers declare which part
of which checkpoint tensor fills each parameter (fused layers take several checkpoint names;
under tensor parallelism each rank reads only its shard). Every parameter must be filled exactly once
with the right shape, and every checkpoint tensor must have a home: anything else is a
`ModelLoadError` naming the tensor, so a wrong mapping can never run silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from workers.distributed import SINGLE_RANK, TensorParallelGroup
from workers.model_errors import ModelLoadError
from workers.progress import progress
from workers.models import MODEL_REGISTRY
from workers.models.layers import Shard
from workers.quantization.base import LinearMethod, process_quantized_layers
from workers.quantization.config import linear_method
from workers.quantization.kv_cache import kv_scale_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Buffers that older checkpoints saved and that Octavo recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

__all__ = ["ModelLoadError", "load_hf_config", "load_model", "model_class", "resolve_dtype"]


def resolve_dtype(config_dtype_str: str, hf_config: Any, device: torch.device | str) -> torch.dtype:
    """"auto" is float32 on the CPU (no fast half-precision matmuls there) and the checkpoint's
    own dtype elsewhere (float32 when the checkpoint does not say)."""
    if config_dtype_str != "auto":
        if config_dtype_str not in DTYPES:
            raise ValueError(f"dtype must be one of {('auto', *DTYPES)}, got {config_dtype_str!r}")
        return DTYPES[config_dtype_str]
    if torch.device(device).type == "cpu":
        return torch.float32
    checkpoint_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if checkpoint_dtype is None:
        return torch.float32
    if isinstance(checkpoint_dtype, torch.dtype):
        return checkpoint_dtype
    name = str(checkpoint_dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ModelLoadError(f"checkpoint dtype {checkpoint_dtype!r} is not supported; "
                             f"supported: {tuple(DTYPES)}")
    return DTYPES[name]


def model_class(model_dir: Path) -> type[nn.Module]:
    """The registered class for the checkpoint's `architectures`, read from config.json
    before transformers parses it, so an unknown model type still gets our error."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"no config.json in model directory {model_dir}")
    try:
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError) as e:
        raise ModelLoadError(f"{config_path} is not a JSON object: {e}") from e
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ModelLoadError(f"unsupported model architecture {architectures} in {config_path}; "
                         f"supported: {sorted(MODEL_REGISTRY)}")


def load_hf_config(model_dir: Path) -> Any:
    """The checkpoint's transformers config, once its architecture is known to be supported."""
    from transformers import AutoConfig  # heavy import, only needed here

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    model_class(model_dir)
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {e}") from e


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device,
               tp_group: TensorParallelGroup = SINGLE_RANK, dummy: bool = False,
               quantization: str | None = None) -> nn.Module:
    """The checkpoint's model on `device`; with a `tp_group` of several ranks, this rank's
    shard of it, reading only that shard's part of each checkpoint tensor. `dummy`: random
    weights from config.json alone, to benchmark a shape whose checkpoint cannot be had.
    `quantization`: --quantization (None: the checkpoint's quantization_config, if any)."""
    model_dir = Path(model_dir)
    hf_config = load_hf_config(model_dir)
    quant = linear_method(hf_config, quantization, dtype, torch.device(device))
    files = [] if dummy else safetensors_files(model_dir)
    # Parameters are torch.empty, so building straight on the device costs no init time.
    with torch.device(device):
        model = _build(model_class(model_dir), hf_config, dtype, tp_group, quant)
    if dummy:
        init_dummy_weights(model)
    else:
        load_weights(model, files, getattr(quant, "ignored_suffixes", ()))
    process_quantized_layers(model)
    return model.eval()


def _build(cls: type[nn.Module], hf_config: Any, dtype: torch.dtype, tp_group: TensorParallelGroup,
           quant: LinearMethod | None) -> nn.Module:
    if quant is None:
        return cls(hf_config, dtype, tp_group)
    try:
        return cls(hf_config, dtype, tp_group, quant=quant)
    except TypeError as e:
        raise ModelLoadError(f"{cls.__name__} does not support quantized linear layers") from e


@torch.no_grad()
def init_dummy_weights(model: nn.Module) -> None:
    """Small uniform values, as vLLM's dummy format: activations stay finite through any
    depth. Drawn from the torch seed, so ranks agree on the replicated parameters. Packed
    integers (4-bit weights, zero points) take random bits; float8 weights, values drawn in
    float32."""
    for param in model.parameters():
        if not param.dtype.is_floating_point:
            param.random_(-(1 << 31), (1 << 31) - 1)
        elif param.dtype.itemsize == 1:
            param.copy_(torch.empty_like(param, dtype=torch.float32).uniform_(-1e-3, 1e-3))
        else:
            param.uniform_(-1e-3, 1e-3)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index (no weight_map): {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists missing files: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in model directory {model_dir}")
    return files


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: `param`, whole (shard None) or this rank's `shard` of it."""

    param: nn.Parameter
    shard: Shard | None


def checkpoint_targets(model: nn.Module) -> dict[str, Target]:
    """Checkpoint tensor name -> its target. Modules with a `checkpoint_shards(param_name)`
    (the parallel layers) say which part of which checkpoint tensor each parameter takes;
    any other parameter takes the whole tensor of its own name."""
    targets: dict[str, Target] = {}
    seen: set[int] = set()  # a tied lm_head shares the embedding; it is filled once
    for module_name, module in model.named_modules():
        parent = module_name.rpartition(".")[0]
        shards_of = getattr(module, "checkpoint_shards", None)
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            for sibling, shard in (shards_of(param_name) if shards_of else {None: None}).items():
                owner = module_name if sibling is None else _join(parent, sibling)
                targets[_join(owner, param_name)] = Target(param, shard)
    return targets


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def load_weights(model: nn.Module, files: list[Path], ignored_suffixes: tuple[str, ...] = ()) -> None:
    """`ignored_suffixes`: checkpoint tensors the quantization method does not read."""
    ignored = IGNORED_SUFFIXES + ignored_suffixes
    targets = checkpoint_targets(model)
    kv_scales = kv_scale_names(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    # (checkpoint substring, ours) pairs: a family's checkpoint names that differ from the
    # module names it shares with another (Mixtral's experts, named as Qwen3-MoE's).
    renames = getattr(model, "CHECKPOINT_RENAMES", ())
    loaded: set[str] = set()
    with torch.no_grad(), progress(len(targets), "loading weights", "tensor") as bar:
        for path in files:
            with _open_safetensors(path) as checkpoint:
                for name in checkpoint.keys():
                    if name.endswith(ignored) or (tied and name == "lm_head.weight"):
                        continue
                    if name in kv_scales:  # an FP8 KV cache's scale: a float of the attention layer
                        layer, attribute = kv_scales[name]
                        setattr(layer, attribute, float(checkpoint.get_tensor(name).float().reshape(-1)[0]))
                        continue
                    key = name
                    for theirs, ours in renames:
                        key = key.replace(theirs, ours)
                    if key not in targets:
                        raise ModelLoadError(f"unexpected tensor {name!r} in {path}: no parameter of "
                                             f"{type(model).__name__} takes it")
                    if key in loaded:
                        raise ModelLoadError(f"tensor {name!r} appears twice, the second time in {path}")
                    _load_tensor(checkpoint, name, targets[key], path)
                    loaded.add(key)
                    bar.update()
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint {files[0].parent} lacks {len(missing)} tensor(s): {missing[:10]}")


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise ModelLoadError(f"cannot read safetensors file {path}: {e}") from e


def _load_tensor(checkpoint: Any, name: str, target: Target, path: Path) -> None:
    """Check the checkpoint tensor's shape, then read into the parameter only the part this
    rank holds (`get_slice` reads just those bytes of the file)."""
    param, shard = target.param, target.shard
    tensor_slice = checkpoint.get_slice(name)
    # A per-tensor scale may be saved as a 0-d tensor; its parameter holds it as [1].
    scalar = not tensor_slice.get_shape()
    shape = (1,) if scalar else tuple(tensor_slice.get_shape())
    dest = param.data if shard is None or shard.stack_index is None else param.data[shard.stack_index]
    expected = list(dest.shape)
    if shard is not None:
        expected[shard.dim] = shard.full
    if shape != tuple(expected):
        raise ModelLoadError(f"tensor {name!r} in {path} has shape {shape}, expected {tuple(expected)}")
    if shard is None:
        # Adopt the tensor: on the CPU in the same dtype it stays a view of the memory-mapped
        # file, saving a copy into freshly faulted-in memory.
        param.data = checkpoint.get_tensor(name).reshape(shape).to(device=param.device, dtype=param.dtype)
        return
    index = [slice(None)] * len(shape)
    index[shard.dim] = slice(shard.start, shard.start + shard.size)
    part = checkpoint.get_tensor(name).reshape(1) if scalar else tensor_slice[tuple(index)]
    dest.narrow(shard.dim, shard.offset, shard.size).copy_(part)
