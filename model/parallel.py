"""Tensor-parallel context: which rank this process is and the group it talks to.

Passed explicitly to every parallel layer at construction (no module-level globals). With
world_size 1 every collective is the identity, so TP=1 runs exactly the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This rank's piece of a checkpoint tensor: `size` indices from `start` along `dim`, out of
    `size * world_size` (equal shares)."""

    dim: int
    start: int
    size: int
    world_size: int

    def full_shape(self, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(local_shape)
        shape[self.dim] = self.size * self.world_size
        return tuple(shape)


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)

    def shard(self, size: int, what: str = "dimension") -> int:
        """Size of this rank's equal share of `size`."""
        assert size % self.world_size == 0, f"{what} {size} is not divisible by tensor_parallel_size {self.world_size}"
        return size // self.world_size

    def shard_slice(self, dim: int, local_size: int) -> Shard:
        """Where this rank's `local_size` share along `dim` lies in the full tensor."""
        return Shard(dim, self.rank * local_size, local_size, self.world_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


SINGLE = ParallelContext()


def init_distributed(rank: int, world_size: int, init_method: str, backend: str) -> ParallelContext:
    """Join the process group of one decoder replica: gloo on CPU, NCCL on CUDA."""
    if world_size > 1 and not dist.is_initialized():
        # a bounded wait: a peer that died must not hang the others for the default 30 minutes
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120))
    return ParallelContext(rank=rank, world_size=world_size)
