"""Vocabulary-parallel token embedding and output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.linear import PackableLinear, linear
from model.parallel import SINGLE, ParallelContext, Shard


class VocabParallelEmbedding(nn.Module):
    """Each rank holds a contiguous slice of the vocabulary; other ranks' tokens embed to zero."""

    def __init__(self, vocab_size: int, dim: int, tp: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.shard = tp.shard(vocab_size, "vocab_size")
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, dim))

    def shard_of(self, param: nn.Parameter, part: int | None = None) -> tuple[torch.Tensor, Shard]:
        return param, self.tp.shard_slice(0, self.shard)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        mine = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight) * mine.unsqueeze(-1)
        return self.tp.all_reduce(out)


class ParallelLMHead(PackableLinear, VocabParallelEmbedding):
    """Untied output projection sharded over the vocabulary; logits gathered in fp32."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_last_dim(linear(hidden, self.weight, packed=self.packed_weight).float())
