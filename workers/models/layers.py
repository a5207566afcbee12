"""Building blocks shared by the model families: linear layers (replicated, and Megatron-style
column- and row-parallel), vocab-parallel embedding and LM head, RMSNorm.

Parameters are created uninitialized (`torch.empty`): every value comes from the
checkpoint, and skipping random init makes construction instant even for large models.

Tensor parallelism: a column-parallel layer keeps its rank's rows of each output (no
communication; its consumer is local), a row-parallel one its rank's columns of the input,
summing the partial outputs with one all-reduce. Each parallel layer says, through
`checkpoint_shards(param_name)`, which part of which checkpoint tensor fills each of its
parameters (a `Shard`); the loader reads just that part. With one rank there is no `Shard`
(the whole tensor fills the parameter) and no collective.

Quantized checkpoints: a linear layer given a `LinearMethod` (workers/quantization) lets it
create the parameters (packed weights, scales, zero points), each with a `ParamLayout` saying
how its dims follow the output and input features, so the same sharding serves every format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kernels import ops
from workers.distributed import SINGLE_RANK, TensorParallelGroup

if TYPE_CHECKING:  # the quantization methods import this module
    from workers.quantization.base import LinearMethod

@dataclass(frozen=True)
class Shard:
    """This rank's part of a checkpoint tensor: indices [start, start + size) along `dim`
    (of length `full` in the checkpoint) fill [offset, offset + size) of the parameter's `dim`.
    With `stack_index`, the parameter stacks one tensor per index along a leading dim (the
    experts of a mixture of experts): then `dim` and `offset` refer to its slot `stack_index`."""

    dim: int
    full: int
    start: int
    size: int
    offset: int = 0
    stack_index: int | None = None


# checkpoint_shards() keys: None stands for the module's own checkpoint name, a string for a
# sibling module's (the separate layers a fused one replaces).
ShardMap = dict[str | None, Shard | None]


def even_shard(full: int, tp: TensorParallelGroup, dim: int = 0) -> Shard:
    """Rank r's 1/world_size of `full` (which the model has checked divides evenly)."""
    size = full // tp.world_size
    return Shard(dim, full, tp.rank * size, size)


@dataclass(frozen=True)
class ParamLayout:
    """How a linear layer's parameter follows its features: dim `out_dim` holds the output
    features `out_pack` to an element (8 for int4 packed in int32, 128 for a block or group
    scale), `in_dim` the input features likewise; None: no such dim (replicated along it).
    `per_part`: one element per checkpoint tensor a fused layer joins (a per-tensor scale)."""

    out_dim: int | None = 0
    in_dim: int | None = 1
    out_pack: int = 1
    in_pack: int = 1
    per_part: bool = False

    def output_shard(self, shard: Shard, part: int) -> Shard:
        """The parameter's part filled by fused part number `part`, which takes `shard`'s rows."""
        if self.per_part:
            return Shard(0, 1, 0, 1, offset=part)
        assert self.out_dim is not None, "a fused layer's parameters follow its output features"
        return _packed(shard, self.out_dim, self.out_pack)

    def input_shard(self, shard: Shard | None) -> Shard | None:
        """This rank's part of the parameter when the input features are sharded."""
        if shard is None or self.in_dim is None:
            return None
        return _packed(shard, self.in_dim, self.in_pack)


def _packed(shard: Shard, dim: int, pack: int) -> Shard:
    if (shard.start | shard.size | shard.offset | shard.full) % pack:
        raise ValueError(f"a shard of {shard.size} features at {shard.start} does not align with "
                         f"the checkpoint's packing of {pack} features; use another tensor_parallel_size")
    return Shard(dim, shard.full // pack, shard.start // pack, shard.size // pack, shard.offset // pack)


WEIGHT_LAYOUTS = {"weight": ParamLayout(), "bias": ParamLayout(in_dim=None)}


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b, with W of shape [out_features, in_features] as in torch and checkpoints;
    replicated on every rank. With a `quant` method, it holds W in that method's parameters and
    computes x W^T through it; the bias stays in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant = quant
        self.layouts: dict[str, ParamLayout] = dict(WEIGHT_LAYOUTS)
        if quant is None:
            self.weight = _param(out_features, in_features, dtype=dtype)
        else:
            quant.create_weights(self, dtype)
        self.bias = _param(out_features, dtype=dtype) if bias else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T, without the bias."""
        return F.linear(x, self.weight) if self.quant is None else self.quant.apply(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quant.apply(self, x)
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(Linear):
    """Several linear layers over the same input fused into one matmul (qkv_proj, gate_up_proj),
    each sharded on its own along its output rows: this rank's fused weight is its q, k and v
    (or gate and up) rows, one after the other.

    `parts` maps each checkpoint layer's name (e.g. "q_proj") to this rank's rows of it (a
    dim-0 `Shard`, as `even_shard` gives); the loader places `...self_attn.q_proj.weight`'s rows
    into `...self_attn.qkv_proj.weight`. Bias rows follow the weight rows.
    """

    def __init__(self, in_features: int, parts: dict[str, Shard], bias: bool,
                 dtype: torch.dtype, quant: LinearMethod | None = None) -> None:
        self.shards: dict[str, Shard] = {}  # before the quant method's create_weights reads it
        offset = 0
        for name, part in parts.items():
            self.shards[name] = dataclasses.replace(part, offset=offset)
            offset += part.size
        super().__init__(in_features, offset, bias, dtype, quant)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split([shard.size for shard in self.shards.values()], dim=-1)

    def checkpoint_shards(self, param_name: str) -> ShardMap:
        layout = self.layouts[param_name]
        return {name: layout.output_shard(shard, part)
                for part, (name, shard) in enumerate(self.shards.items())}


class RowParallelLinear(Linear):
    """A linear layer whose input features are sharded (the output of a column-parallel layer):
    each rank multiplies its slice, one all-reduce sums them, and the bias is added once, after."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 tp: TensorParallelGroup = SINGLE_RANK, quant: LinearMethod | None = None) -> None:
        shard = even_shard(in_features, tp, dim=1)
        super().__init__(shard.size, out_features, bias, dtype, quant)
        self.tp = tp
        self.shard = shard if tp.world_size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(x)
        y = self.tp.all_reduce(self.matmul(x))
        return y if self.bias is None else y + self.bias

    def checkpoint_shards(self, param_name: str) -> ShardMap:
        return {None: self.layouts[param_name].input_shard(self.shard)}


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous range of ceil(vocab / world_size) rows; the last ranks' ranges
    are padded past the vocabulary with zero rows. Ids outside this rank's range embed to zero
    and an all-reduce sums the ranks' rows, so each id gets the row of its owner."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = num_embeddings
        per_rank = -(-num_embeddings // tp.world_size)
        self.vocab_start = tp.rank * per_rank
        self.num_valid = max(0, min(per_rank, num_embeddings - self.vocab_start))
        self.weight = _param(per_rank, embedding_dim, dtype=dtype)
        self.shard = None
        if tp.world_size > 1:
            self.shard = Shard(0, num_embeddings, self.vocab_start, self.num_valid)
            with torch.no_grad():
                self.weight[self.num_valid:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_valid)
        embedded = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(embedded.masked_fill_(outside.unsqueeze(-1), 0))

    def checkpoint_shards(self, param_name: str) -> ShardMap:
        return {None: self.shard}


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded over the vocabulary like the embedding (so a tied head
    shares the embedding's shard): each rank computes its range's logits, an all-gather joins
    them, and the padding past the vocabulary is dropped."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.linear(hidden, self.weight)
        logits = self.tp.all_gather(F.linear(hidden, self.weight))
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., :self.vocab_size].contiguous()
        return logits


class RMSNorm(nn.Module):
    """RMSNorm over the last dim; with `residual`, normalizes `x + residual` and returns the sum
    as the new residual (the fused add-norm between decoder sublayers). Replicated."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual)
