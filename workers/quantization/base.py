"""The interface between a linear layer and its quantization method.

A method is one object per model (its settings come from the checkpoint's
quantization_config or the --quantization flag) shared by every quantized linear layer; the
per-layer state lives in the layer's parameters, which the method creates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from workers.models.layers import Linear


class LinearMethod(Protocol):
    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        """Register the layer's parameters for `layer.in_features` x `layer.out_features` (this
        rank's), named as the checkpoint names them, each with its `layer.layouts` entry."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Turn the loaded parameters into what `apply` reads (quantize, repack, merge scales)."""

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, in_features] @ W^T -> [tokens, out_features] in x's dtype, without the bias."""


def set_param(layer: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace (or add) a layer's parameter with `tensor`, frozen."""
    setattr(layer, name, nn.Parameter(tensor, requires_grad=False))


def process_quantized_layers(model: nn.Module) -> None:
    """After the weights are in (or the dummy ones drawn): each quantized layer's method once."""
    with torch.no_grad():
        for module in model.modules():
            method = getattr(module, "quant", None)
            if method is not None:
                method.process_weights_after_loading(module)
