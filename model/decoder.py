"""Mistral decoder blocks: pre-norm, GQA attention with 1D RoPE, SwiGLU feed-forward, no biases.

Written once for any tensor-parallel size: heads and the hidden dimension are split by the
column/row-parallel layers, which also own the only collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelArgs
from model.layers.attention import AttentionBatch, KVCache, causal_attention
from model.layers.linear import ColumnParallelLinear, RowParallelLinear
from model.layers.norm import RMSNorm
from model.layers.rotary import apply_rope
from model.parallel import ParallelContext


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: ParallelContext) -> None:
        super().__init__()
        self.n_heads = tp.shard(args.n_heads, "n_heads")
        self.n_kv_heads = tp.shard(args.n_kv_heads, "n_kv_heads")
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * args.head_dim, tp=tp)
        self.wk = ColumnParallelLinear(args.dim, args.n_kv_heads * args.head_dim, tp=tp)
        self.wv = ColumnParallelLinear(args.dim, args.n_kv_heads * args.head_dim, tp=tp)
        self.wo = RowParallelLinear(args.n_heads * args.head_dim, args.dim, tp=tp)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, batch: AttentionBatch,
                cache: KVCache | None) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rope(self.wq(x).view(t, self.n_heads, self.head_dim), angles)  # (T, h, d)
        k = apply_rope(self.wk(x).view(t, self.n_kv_heads, self.head_dim), angles)  # (T, hkv, d)
        v = self.wv(x).view(t, self.n_kv_heads, self.head_dim)
        out = causal_attention(q, k, v, batch, cache, self.head_dim ** -0.5)  # (T, h, d)
        return self.wo(out.reshape(t, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp: ParallelContext) -> None:
        super().__init__()
        self.w1 = ColumnParallelLinear(args.dim, args.hidden_dim, tp=tp)  # gate
        self.w2 = RowParallelLinear(args.hidden_dim, args.dim, tp=tp)  # down
        self.w3 = ColumnParallelLinear(args.dim, args.hidden_dim, tp=tp)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, tp: ParallelContext) -> None:
        super().__init__()
        self.attention = Attention(args, tp)
        self.feed_forward = FeedForward(args, tp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, batch: AttentionBatch,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), angles, batch, cache)
        return x + self.feed_forward(self.ffn_norm(x))
