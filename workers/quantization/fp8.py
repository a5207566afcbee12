"""FP8 (e4m3) weights with per-output-channel scales and activations quantized per token (or by
a static per-tensor scale), from a 16-bit checkpoint on the fly (`--quantization fp8`) or from
pre-quantized checkpoints:

- compressed-tensors `float-quantized` (llm-compressor): `weight` float8, `weight_scale`
  float32 [out, 1] (strategy channel) or [1] (strategy tensor), `input_scale` [1] when the
  activations are static;
- `quant_method: fp8`: `weight` float8 with a per-tensor `weight_scale` (AutoFP8), or with
  `weight_scale_inv` [ceil(out / b0), ceil(in / b1)] of `weight_block_size` blocks
  (DeepSeek-V3, Qwen3-FP8), and `input_scale` with `activation_scheme: static`.

Every layout becomes one scale per output channel after loading: a fused layer's per-tensor
scales (one per q/k/v or gate/up tensor) repeat over their rows; block scales are applied and
the weight requantized per channel (one more rounding, in exchange for one GEMM for all
formats: cuBLAS's row-wise scaled FP8 matmul)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import ops
from kernels.reference import FP8_KV_DTYPE as FP8_DTYPE
from kernels.reference import FP8_MAX
from workers.models.layers import Linear, ParamLayout, _param
from workers.quantization.base import set_param

WEIGHT_STRATEGIES = ("tensor", "channel", "block")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (float8 weight, float32 scales [out]), weight ~ q * scale[:, None]."""
    w32 = weight.float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def _num_parts(layer: Linear) -> int:
    return len(getattr(layer, "shards", ())) or 1  # a fused layer's checkpoint tensors


@dataclass(frozen=True)
class Fp8Method:
    """`strategy` None: on the fly from the checkpoint's 16-bit `weight`; otherwise how the
    checkpoint's float8 weight is scaled, under `scale_name`."""

    strategy: str | None = None
    scale_name: str = "weight_scale"
    block: tuple[int, int] | None = None  # strategy "block": [rows, cols] per scale
    static_input: bool = False  # the checkpoint's `input_scale` instead of per-token scales

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        if self.strategy is None:
            layer.weight = _param(n, k, dtype=dtype)
            return
        layer.weight = _param(n, k, dtype=FP8_DTYPE)
        if self.strategy == "tensor":
            setattr(layer, self.scale_name, _param(_num_parts(layer), dtype=torch.float32))
            layer.layouts[self.scale_name] = ParamLayout(in_dim=None, per_part=True)
        elif self.strategy == "channel":
            setattr(layer, self.scale_name, _param(n, 1, dtype=torch.float32))
            layer.layouts[self.scale_name] = ParamLayout(in_dim=None)
        else:
            rows, cols = self.block
            setattr(layer, self.scale_name, _param(-(-n // rows), -(-k // cols), dtype=torch.float32))
            layer.layouts[self.scale_name] = ParamLayout(out_pack=rows, in_pack=cols)
        if self.static_input:
            layer.input_scale = _param(_num_parts(layer), dtype=torch.float32)
            layer.layouts["input_scale"] = ParamLayout(in_dim=None, per_part=True)

    def process_weights_after_loading(self, layer: Linear) -> None:
        if self.strategy is None:
            weight, scale = quantize_per_channel(layer.weight)
        else:
            weight, scale = layer.weight.data, getattr(layer, self.scale_name).data
            delattr(layer, self.scale_name)
            if self.strategy == "tensor":
                sizes = [shard.size for shard in layer.shards.values()] if hasattr(layer, "shards") \
                    else [layer.out_features]
                scale = scale.repeat_interleave(torch.tensor(sizes, device=scale.device))
            elif self.strategy == "channel":
                scale = scale.reshape(-1)
            else:
                rows, cols = self.block
                full = scale.repeat_interleave(rows, 0)[:weight.shape[0]].repeat_interleave(cols, 1)
                weight, scale = quantize_per_channel(weight.float() * full[:, :weight.shape[1]])
        set_param(layer, "weight", weight)
        set_param(layer, "weight_scale", scale.float().contiguous())
        if self.static_input:
            # One scale for the fused tensors' shared input: the largest never saturates.
            set_param(layer, "input_scale", layer.input_scale.data.max().reshape(1))

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return ops.fp8_linear(x, layer.weight, layer.weight_scale,
                              layer.input_scale if self.static_input else None)
