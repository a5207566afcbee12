"""AWQ checkpoints (`quant_method: awq`, `version: gemm`, AutoAWQ's layout), 4-bit with zero
points, served by the W4A16 kernel.

Tensors per linear layer (in = input features, out = output features, g = group_size):
- `qweight` [in, out / 8] int32: packed along the output dim, nibble i of a word holding column
  8c + AWQ_ORDER[i] (AutoAWQ interleaves [0, 2, 4, 6, 1, 3, 5, 7] for its dequantization trick);
- `qzeros` [in / g, out / 8] int32, packed the same way, the zero points as stored;
- `scales` [in / g, out] float16.
W[k, n] = (q[k, n] - zero[k // g, n]) * scale[k // g, n]. After loading, qweight is repacked
along the input dim (the kernel's layout, still 4 bits a weight) and the zeros unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.models.layers import Linear, ParamLayout, _param
from workers.quantization.base import set_param
from workers.quantization.int4 import NIBBLES, W4A16Weights, pack_int4_rows, unpack_int4_cols

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class AWQMethod(W4A16Weights):
    group_size: int

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        self.check_groups(layer)
        k, n, g = layer.in_features, layer.out_features, self.group_size
        layer.qweight = _param(k, n // NIBBLES, dtype=torch.int32)
        layer.qzeros = _param(k // g, n // NIBBLES, dtype=torch.int32)
        layer.scales = _param(k // g, n, dtype=dtype)
        layer.layouts.update(
            qweight=ParamLayout(out_dim=1, out_pack=NIBBLES, in_dim=0),
            qzeros=ParamLayout(out_dim=1, out_pack=NIBBLES, in_dim=0, in_pack=g),
            scales=ParamLayout(out_dim=1, in_dim=0, in_pack=g))

    def process_weights_after_loading(self, layer: Linear) -> None:
        set_param(layer, "qweight", pack_int4_rows(unpack_int4_cols(layer.qweight, AWQ_ORDER)))
        layer.zeros = unpack_int4_cols(layer.qzeros, AWQ_ORDER).to(layer.scales.dtype)
        del layer.qzeros
