"""Mistral decoder blocks: pre-norm, GQA attention with 1D RoPE, SwiGLU feed-forward, no biases.

Written once for any tensor-parallel size: heads and the hidden dimension are split by the
column/row-parallel layers, which also own the only collectives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelArgs
from model.layers.attention import AttentionMetadata, KVCache, causal_attention
from model.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from model.layers.norm import RMSNorm
from model.layers.rotary import apply_rope
from model.parallel import ParallelContext


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, tp: ParallelContext) -> None:
        super().__init__()
        self.n_heads = tp.shard(args.n_heads, "n_heads")
        self.n_kv_heads = tp.shard(args.n_kv_heads, "n_kv_heads")
        self.head_dim = args.head_dim
        kv_width = args.n_kv_heads * args.head_dim
        # checkpoint tensors wq, wk, wv load into one matmul
        fp8 = args.quantization == "fp8"
        self.wqkv = MergedColumnParallelLinear(args.dim, [args.n_heads * args.head_dim, kv_width, kv_width],
                                               ["wq", "wk", "wv"], tp=tp, fp8=fp8)
        self.wo = RowParallelLinear(args.n_heads * args.head_dim, args.dim, tp=tp, fp8=fp8)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, batch: AttentionMetadata,
                cache: KVCache | None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.wqkv(x)
        q = apply_rope(q.reshape(t, self.n_heads, self.head_dim), rotation)  # (T, h, d)
        k = apply_rope(k.reshape(t, self.n_kv_heads, self.head_dim), rotation)  # (T, hkv, d)
        v = v.reshape(t, self.n_kv_heads, self.head_dim)
        out = causal_attention(q, k, v, batch, cache, self.head_dim ** -0.5)  # (T, h, d)
        return self.wo(out.reshape(t, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp: ParallelContext) -> None:
        super().__init__()
        # checkpoint tensors w1 (gate) and w3 (up) load into one matmul
        fp8 = args.quantization == "fp8"
        self.w13 = MergedColumnParallelLinear(args.dim, [args.hidden_dim, args.hidden_dim], ["w1", "w3"], tp=tp,
                                              fp8=fp8)
        self.w2 = RowParallelLinear(args.hidden_dim, args.dim, tp=tp, fp8=fp8)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x)
        return self.w2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, tp: ParallelContext) -> None:
        super().__init__()
        self.attention = Attention(args, tp)
        self.feed_forward = FeedForward(args, tp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, batch: AttentionMetadata,
                cache: KVCache | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rotation, batch, cache)
        return x + self.feed_forward(self.ffn_norm(x))
