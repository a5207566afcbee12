"""Which quantization method a model's linear layers use: the checkpoint's config.json
`quantization_config`, or `--quantization fp8` for a 16-bit checkpoint. Every setting Octavo
cannot serve is refused here, before any weight loads, with a ValueError naming it."""

from __future__ import annotations

from typing import Any

import torch

from workers.quantization.awq import AWQMethod
from workers.quantization.base import LinearMethod
from workers.quantization.device import check_fp8_supported
from workers.quantization.fp8 import WEIGHT_STRATEGIES, Fp8Method
from workers.quantization.gptq import GPTQMethod

SUPPORTED_BITS = 4


def checkpoint_quantization(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's quantization_config (a dict), if any."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    return config if isinstance(config, dict) else config.to_dict()


def linear_method(hf_config: Any, setting: str | None, dtype: torch.dtype,
                  device: torch.device) -> LinearMethod | None:
    """The method for `--quantization setting` (None: the checkpoint's) on this checkpoint."""
    config = checkpoint_quantization(hf_config)
    method_name = config.get("quant_method") if config else None
    if setting is not None and method_name is not None and setting != method_name:
        raise ValueError(f"quantization {setting!r} does not match the checkpoint's quantization_config."
                         f"quant_method {method_name!r}; leave --quantization out to use the checkpoint's")
    if method_name is None:
        if setting is None:
            return None
        if setting != "fp8":
            raise ValueError(f"quantization {setting!r} needs a checkpoint quantized with it (its config.json's "
                             f"quantization_config); on a 16-bit checkpoint only 'fp8' quantizes on the fly")
        return _fp8_on_device(Fp8Method(), "quantization 'fp8'", dtype, device)
    if method_name == "fp8":
        return _fp8_on_device(_fp8_checkpoint(config), "quant_method 'fp8'", dtype, device)
    if method_name == "compressed-tensors":
        return _fp8_on_device(_compressed_tensors(config), "quant_method 'compressed-tensors'", dtype, device)
    if method_name == "awq":
        return _awq(config)
    if method_name == "gptq":
        return _gptq(config)
    raise ValueError(f"quantization_config.quant_method {method_name!r} is not supported; supported: "
                     f"'fp8', 'compressed-tensors' (float-quantized), 'awq' (gemm), 'gptq' (4-bit)")


def _fp8_on_device(method: Fp8Method, setting: str, dtype: torch.dtype, device: torch.device) -> Fp8Method:
    check_fp8_supported(device, setting)
    if device.type == "cuda" and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{setting} needs dtype bfloat16 or float16 on a GPU, got {str(dtype).removeprefix('torch.')}")
    return method


def _fp8_checkpoint(config: dict[str, Any]) -> Fp8Method:
    fmt = config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt {fmt!r} is not supported; supported: 'e4m3'")
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"quantization_config.activation_scheme {scheme!r} is not supported; "
                         f"supported: 'dynamic', 'static'")
    block = config.get("weight_block_size")
    if block is not None:
        if len(block) != 2:
            raise ValueError(f"quantization_config.weight_block_size must be [rows, cols], got {block!r}")
        return Fp8Method("block", "weight_scale_inv", tuple(block), scheme == "static")
    return Fp8Method("tensor", "weight_scale", None, scheme == "static")


def _compressed_tensors(config: dict[str, Any]) -> Fp8Method:
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"quantization_config.config_groups must hold one group (every Linear layer alike), "
                         f"got {len(groups)}")
    group = groups[0]
    fmt = group.get("format") or config.get("format")
    if fmt != "float-quantized":
        raise ValueError(f"quantization_config.format {fmt!r} (compressed-tensors) is not supported; "
                         f"supported: 'float-quantized' (FP8)")
    weights = group.get("weights") or {}
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ValueError(f"compressed-tensors weights of type {weights.get('type')!r} with {weights.get('num_bits')} "
                         f"bits are not supported; supported: float, 8 bits")
    strategy = weights.get("strategy")
    if strategy not in WEIGHT_STRATEGIES:
        raise ValueError(f"compressed-tensors weights strategy {strategy!r} is not supported; "
                         f"supported: {WEIGHT_STRATEGIES}")
    block = tuple(weights["block_structure"]) if strategy == "block" else None
    activations = group.get("input_activations") or {}
    static = bool(activations) and not activations.get("dynamic", True)
    if static and activations.get("strategy", "tensor") != "tensor":
        raise ValueError(f"compressed-tensors static input_activations strategy {activations.get('strategy')!r} "
                         f"is not supported; supported: 'tensor'")
    ignored = [name for name in config.get("ignore") or () if "lm_head" not in name]
    if ignored:
        raise ValueError(f"quantization_config.ignore lists {ignored[:3]}: only the LM head may stay unquantized")
    return Fp8Method(strategy, "weight_scale", block, static)


def _check_int4(config: dict[str, Any], method: str) -> int:
    bits = config.get("bits", config.get("w_bit"))
    if bits != SUPPORTED_BITS:
        raise ValueError(f"{method} quantization_config.bits {bits!r} is not supported; supported: 4")
    group_size = config.get("group_size", config.get("q_group_size"))
    if not isinstance(group_size, int) or group_size < 16 or group_size % 16:
        raise ValueError(f"{method} quantization_config.group_size {group_size!r} is not supported; "
                         f"supported: a multiple of 16 (128 as usual)")
    return group_size


def _awq(config: dict[str, Any]) -> AWQMethod:
    group_size = _check_int4(config, "awq")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"awq quantization_config.version {version!r} is not supported; supported: 'gemm'")
    if not config.get("zero_point", True):
        raise ValueError("awq quantization_config.zero_point false is not supported; supported: true")
    if config.get("modules_to_not_convert"):
        raise ValueError(f"awq quantization_config.modules_to_not_convert {config['modules_to_not_convert']!r} "
                         f"is not supported: every linear layer must be quantized")
    return AWQMethod(group_size)


def _gptq(config: dict[str, Any]) -> GPTQMethod:
    group_size = _check_int4(config, "gptq")
    if config.get("desc_act"):
        raise ValueError("gptq quantization_config.desc_act true (act-order) is not supported; supported: false")
    checkpoint_format = config.get("checkpoint_format", "gptq")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq quantization_config.checkpoint_format {checkpoint_format!r} is not supported; "
                         f"supported: 'gptq', 'gptq_v2'")
    return GPTQMethod(group_size, zero_offset=1 if checkpoint_format == "gptq" else 0)

