"""The 4-bit weight layout the W4A16 kernel reads, and the unpacking of the checkpoint formats'
int32 words into it.

Kernel layout (GPTQ's packing of the weight): `qweight` [in / 8, out] int32, nibble j (bits
4j..4j+3) of row r holding input row 8r + j; `scales` and `zeros` [in / group, out] in the
model's dtype, W[k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n].
"""

from __future__ import annotations

import torch

from kernels import ops
from workers.models.layers import Linear

NIBBLES = 8  # 4-bit values per int32
SEQUENTIAL_ORDER = tuple(range(NIBBLES))


def unpack_int4_cols(packed: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL_ORDER) -> torch.Tensor:
    """[rows, cols / 8] int32, nibble i of each word holding column 8c + order[i] of its eight
    -> [rows, cols] int32 in [0, 16)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed[:, :, None] >> shifts) & 0xF  # [rows, cols / 8, nibble]
    unpacked = torch.empty_like(nibbles)
    unpacked[:, :, list(order)] = nibbles
    return unpacked.reshape(packed.shape[0], -1)


def pack_int4_rows(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in [0, 16) -> [rows / 8, cols] int32 in the kernel layout."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)
    words = (values.long().view(-1, NIBBLES, values.shape[1]) << shifts[None, :, None]).sum(1)
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement wrap-around


class W4A16Weights:
    """The forward shared by AWQ and GPTQ once repacked: the Triton W4A16 GEMM on a GPU, its
    reference (which dequantizes per call) on the CPU."""

    group_size: int

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return ops.w4a16_linear(x, layer.qweight, layer.scales, layer.zeros, self.group_size)

    def check_groups(self, layer: Linear) -> None:
        if layer.in_features % self.group_size:
            raise ValueError(f"quantization_config.group_size {self.group_size} must divide this rank's "
                             f"{layer.in_features} input features of a linear layer")
