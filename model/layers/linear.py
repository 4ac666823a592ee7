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


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} != model shape {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(tp.shard(out_features, "output features"), in_features))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0])) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        shard = param.shape[0]
        copy_checked(param, loaded.narrow(0, self.tp.rank * shard, shard) if self.tp.world_size > 1 else loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: ParallelContext = SINGLE) -> None:
        super().__init__()
        assert not bias, "row-parallel bias would be added once per rank"
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, tp.shard(in_features, "input features")))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        shard = param.shape[1]
        copy_checked(param, loaded.narrow(1, self.tp.rank * shard, shard) if self.tp.world_size > 1 else loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))
