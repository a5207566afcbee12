"""The FP8 KV cache: its dtype, and where a checkpoint keeps its per-tensor k/v scales.

The cache holds key / k_scale and value / v_scale in float8 e4m3 (`kernels.reference.
quantize_kv`); the attention kernels read it back times the scales, in float32. Checkpoints
calibrated for an FP8 cache (llm-compressor's `kv_cache_scheme`, AutoFP8's) ship one scale per
layer under vLLM's names; without them the scales are 1.0, which suits activations within
e4m3's +-448.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention import Attention
from workers.quantization.device import check_fp8_supported

FP8_KV_DTYPE = torch.float8_e4m3fn
# Names a checkpoint gives layer N's scales, relative to the attention block holding the q/k/v
# projections (`model.layers.N.self_attn`): vLLM reads all three spellings.
_SCALE_NAMES = {"k_scale": ("k_scale", "k_proj.k_scale", "attn.k_scale"),
                "v_scale": ("v_scale", "v_proj.v_scale", "attn.v_scale")}


def kv_cache_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The cache's torch dtype for `--kv-cache-dtype`: auto is the model's."""
    if setting == "auto":
        return model_dtype
    check_fp8_supported(device, f"kv_cache_dtype {setting!r}")
    return FP8_KV_DTYPE


def kv_scale_names(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Checkpoint tensor name -> (attention layer, "k_scale" or "v_scale") for every spelling
    of every layer's scales: the attention layers are the models' `...self_attn.attn`."""
    names: dict[str, tuple[nn.Module, str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Attention):
            block = module_name.rpartition(".")[0]
            for attribute, spellings in _SCALE_NAMES.items():
                for spelling in spellings:
                    names[f"{block}.{spelling}"] = (module, attribute)
    return names
