"""Linear layers that hold one tensor-parallel shard and load it from the full checkpoint tensor.

ColumnParallelLinear splits the output features (no communication); RowParallelLinear splits the
input features and all-reduces the partial sums. A column layer followed by a row layer (attention
qkv -> wo, feed-forward w1/w3 -> w2) needs exactly one all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.parallel import SINGLE, ParallelContext


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), through the CPU-packed copy of the weight when there is one."""
    if packed is not None and x.is_cpu and x.dim() == 2 and x.dtype == packed.dtype:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackableLinear:
    """A layer whose `weight` is used as `x @ weight.T`, and may keep a CPU-packed copy of it.

    On CPU, oneDNN with the weight reordered once into its blocked layout runs these matmuls
    about 2x faster than the BLAS path for decode-sized batches (1-32 rows) and 1.2-1.4x for
    prefill, still in plain fp32 arithmetic, and gives a row the same result whatever else is in
    the batch (tests/test_layers.py).
    The packed copy is made by `pack_linear_weights` after loading (it does not follow later
    in-place changes of `weight`); GPUs never pack.
    """

    packed_weight: torch.Tensor | None = None

    def pack(self, enabled: bool = True) -> None:
        self.packed_weight = None
        if enabled and _can_pack(self.weight):
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())


def pack_linear_weights(model: nn.Module, enabled: bool = True) -> int:
    """Pack every PackableLinear of `model` for CPU inference (enabled=False drops the packed
    copies, back to the plain matmul); returns how many are packed."""
    packed = 0
    for module in model.modules():
        if isinstance(module, PackableLinear):
            module.pack(enabled)
            packed += module.packed_weight is not None
    return packed


class Linear(PackableLinear, nn.Linear):
    """nn.Linear (same parameters and initialisation) that runs through the packed path when packed.

    For layers that are never sharded: the vision encoder and the vision-language adapter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} != model shape {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(PackableLinear, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(tp.shard(out_features, "output features"), in_features))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0])) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        shard = param.shape[0]
        copy_checked(param, loaded.narrow(0, self.tp.rank * shard, shard) if self.tp.world_size > 1 else loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class RowParallelLinear(PackableLinear, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: ParallelContext = SINGLE) -> None:
        super().__init__()
        assert not bias, "row-parallel bias would be added once per rank"
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, tp.shard(in_features, "input features")))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        shard = param.shape[1]
        copy_checked(param, loaded.narrow(1, self.tp.rank * shard, shard) if self.tp.world_size > 1 else loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(x, self.weight, packed=self.packed_weight))


class MergedColumnParallelLinear(PackableLinear, nn.Module):
    """Several column-parallel projections of one input as one matmul (q/k/v, or gate/up).

    The checkpoint stores the parts separately (`part_names`); each loads into its own rows of this
    rank's weight, which holds this rank's slice of every part.
    """

    def __init__(self, in_features: int, out_features: list[int], part_names: list[str],
                 tp: ParallelContext = SINGLE) -> None:
        super().__init__()
        assert len(out_features) == len(part_names), (out_features, part_names)
        self.tp = tp
        self.part_names = part_names
        self.full_sizes = list(out_features)
        self.sizes = [tp.shard(n, f"output features of {p}") for n, p in zip(out_features, part_names)]
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), in_features))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str, part: int) -> None:
        size, offset = self.sizes[part], sum(self.sizes[:part])
        shard = loaded.narrow(0, self.tp.rank * size, size) if self.tp.world_size > 1 else loaded
        copy_checked(param.data.narrow(0, offset, size), shard, name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight, packed=self.packed_weight).split(self.sizes, dim=-1)
