"""GPTQ checkpoints (`quant_method: gptq`, 4 bits, `desc_act` false; AutoGPTQ / GPTQModel's
v1 layout), served by the W4A16 kernel.

Tensors per linear layer (in = input features, out = output features, g = group_size):
- `qweight` [in / 8, out] int32: packed along the input dim, nibble j of row r holding input
  row 8r + j (the kernel's own layout);
- `qzeros` [in / g, out / 8] int32: packed along the output dim in order, each stored as
  zero - 1 (v1's off-by-one: a symmetric checkpoint stores 7 for its zero point 8);
- `scales` [in / g, out] float16;
- `g_idx` [in]: each input row's group; with desc_act false it is k // g, so it is not read.
W[k, n] = (q[k, n] - zero[k // g, n]) * scale[k // g, n].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.models.layers import Linear, ParamLayout, _param
from workers.quantization.int4 import NIBBLES, W4A16Weights, unpack_int4_cols

IGNORED_SUFFIXES = (".g_idx",)


@dataclass(frozen=True)
class GPTQMethod(W4A16Weights):
    group_size: int
    zero_offset: int = 1  # v1 checkpoints store zero - 1; gptq_v2 ones the zero itself

    ignored_suffixes = IGNORED_SUFFIXES

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        self.check_groups(layer)
        k, n, g = layer.in_features, layer.out_features, self.group_size
        layer.qweight = _param(k // NIBBLES, n, dtype=torch.int32)
        layer.qzeros = _param(k // g, n // NIBBLES, dtype=torch.int32)
        layer.scales = _param(k // g, n, dtype=dtype)
        layer.layouts.update(
            qweight=ParamLayout(out_dim=1, in_dim=0, in_pack=NIBBLES),
            qzeros=ParamLayout(out_dim=1, out_pack=NIBBLES, in_dim=0, in_pack=g),
            scales=ParamLayout(out_dim=1, in_dim=0, in_pack=g))

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.zeros = (unpack_int4_cols(layer.qzeros) + self.zero_offset).to(layer.scales.dtype)
        del layer.qzeros
