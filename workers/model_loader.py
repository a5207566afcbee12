"""Load a Hugging Face style checkpoint directory (config.json + safetensors) into Octavo's
own model classes.

Checkpoint tensors are matched to parameters by name; fused layers (`MergedLinear`) declare
which checkpoint names fill which of their rows. Every parameter must be filled exactly once
with the right shape, and every checkpoint tensor must have a home: anything else is a
`ModelLoadError` naming the tensor, so a wrong mapping can never run silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from workers.model_errors import ModelLoadError
from workers.models import MODEL_REGISTRY

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


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    model_dir = Path(model_dir)
    hf_config = load_hf_config(model_dir)
    files = safetensors_files(model_dir)
    # Parameters are torch.empty, so building straight on the device costs no init time.
    with torch.device(device):
        model = model_class(model_dir)(hf_config, dtype)
    load_weights(model, files)
    return model.eval()


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


def checkpoint_targets(model: nn.Module) -> dict[str, tuple[nn.Parameter, slice | None]]:
    """Checkpoint tensor name -> (parameter, rows it fills, None for all)."""
    targets: dict[str, tuple[nn.Parameter, slice | None]] = {}
    seen: set[int] = set()  # a tied lm_head shares the embedding; it is filled once
    for module_name, module in model.named_modules():
        shards: dict[str, slice] = getattr(module, "shards", {})
        parent = module_name.rpartition(".")[0]
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if shards:
                for shard_name, rows in shards.items():
                    targets[_join(parent, shard_name, param_name)] = (param, rows)
            else:
                targets[_join(module_name, param_name)] = (param, None)
    return targets


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def load_weights(model: nn.Module, files: list[Path]) -> None:
    targets = checkpoint_targets(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    with torch.no_grad(), tqdm(total=len(targets), desc="Loading weights", unit="tensor") as bar:
        for path in files:
            try:
                checkpoint = safe_open(path, framework="pt")
            except SafetensorError as e:
                raise ModelLoadError(f"cannot read safetensors file {path}: {e}") from e
            with checkpoint:
                for name in checkpoint.keys():
                    if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                        continue
                    if name not in targets:
                        raise ModelLoadError(f"unexpected tensor {name!r} in {path}: no parameter of "
                                             f"{type(model).__name__} takes it")
                    param, rows = targets[name]
                    dest = param.data if rows is None else param.data[rows]
                    tensor = checkpoint.get_tensor(name)
                    if tensor.shape != dest.shape:
                        raise ModelLoadError(f"tensor {name!r} in {path} has shape {tuple(tensor.shape)}, "
                                             f"expected {tuple(dest.shape)}")
                    if rows is None:
                        # Adopt the tensor: on the CPU in the same dtype it stays a view of the
                        # memory-mapped file, saving a copy into freshly faulted-in memory.
                        param.data = tensor.to(device=param.device, dtype=param.dtype)
                    else:
                        dest.copy_(tensor)
                    loaded.add(name)
                    bar.update()
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint {files[0].parent} lacks {len(missing)} tensor(s): {missing[:10]}")
