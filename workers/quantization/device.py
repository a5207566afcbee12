"""What the device must support for each quantized format, checked before anything loads so
that an unsupported combination is one line naming the setting (a ValueError)."""

from __future__ import annotations

import torch

# float8 e4m3 conversions and matmuls in hardware: Ada (8.9) and Hopper (9.0) and up.
FP8_MIN_CAPABILITY = (8, 9)


def check_fp8_supported(device: torch.device, setting: str) -> None:
    """`setting` (e.g. "kv_cache_dtype 'fp8'") needs FP8 on a CUDA device; the CPU emulates it."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(f"{setting} needs a GPU of compute capability >= "
                         f"{'.'.join(map(str, FP8_MIN_CAPABILITY))} (Ada, Hopper or later); "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
