"""Attention over ragged batches of sequences, with or without a paged KV cache.

A batch is a flat list of tokens from several sequences (`AttentionBatch.query_lens`). Without a
cache each sequence attends causally to its own tokens. With a cache, new keys/values are first
written to their slots, and each sequence then attends to its whole context read through its
block table: the same code serves prefill, chunked prefill and decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    query_lens: list[int]  # new tokens per sequence, in batch order
    context_lens: list[int]  # tokens per sequence after this step (cached + new)
    slot_mapping: torch.Tensor | None = None  # (T,) cache slot of every new token
    block_tables: torch.Tensor | None = None  # (B, max_blocks) block ids, padded with 0
    block_size: int = 0

    @staticmethod
    def no_cache(query_lens: list[int]) -> "AttentionBatch":
        return AttentionBatch(query_lens=list(query_lens), context_lens=list(query_lens))


@dataclass
class KVCache:
    """One layer's cache: (num_blocks, block_size, n_kv_heads, head_dim) for keys and values."""

    k: torch.Tensor
    v: torch.Tensor


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch,
                     cache: KVCache | None, scale: float) -> torch.Tensor:
    """q: (T, n_heads, d); k, v: (T, n_kv_heads, d) for the new tokens -> (T, n_heads, d)."""
    if cache is None:
        return _attend_segments(q, k.split(batch.query_lens), v.split(batch.query_lens), batch.query_lens, scale)
    flat_k = cache.k.view(-1, *cache.k.shape[2:])  # (slots, hkv, d)
    flat_v = cache.v.view(-1, *cache.v.shape[2:])
    flat_k.index_copy_(0, batch.slot_mapping, k)
    flat_v.index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    starts = [0]
    for n in batch.query_lens:
        starts.append(starts[-1] + n)
    decodes = [i for i, n in enumerate(batch.query_lens) if n == 1]
    if len(decodes) > 1:  # one padded call for all single-token queries
        rows = torch.tensor([starts[i] for i in decodes], device=q.device)
        out[rows] = _decode_padded(q[rows], cache, batch.block_tables[rows.new_tensor(decodes)],
                                   [batch.context_lens[i] for i in decodes], batch.block_size, scale)
    else:
        decodes = []
    for i, ctx in enumerate(batch.context_lens):
        if i in decodes:
            continue
        slots = _context_slots(batch.block_tables[i], ctx, batch.block_size)
        lo, hi = starts[i], starts[i + 1]
        out[lo:hi] = _attend_segments(q[lo:hi], [flat_k[slots]], [flat_v[slots]], [hi - lo], scale)
    return out


def _context_slots(block_table: torch.Tensor, ctx: int, block_size: int) -> torch.Tensor:
    n_blocks = (ctx + block_size - 1) // block_size
    offsets = torch.arange(block_size, device=block_table.device)
    return (block_table[:n_blocks, None] * block_size + offsets[None, :]).flatten()[:ctx]


def _attend_segments(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                     query_lens: list[int], scale: float) -> torch.Tensor:
    """One SDPA call per sequence: its new queries against its whole context (causal)."""
    outs = []
    for qi, ki, vi in zip(q.split(query_lens), ks, vs):
        n_q, n_k = qi.shape[0], ki.shape[0]
        # Query j sits at context position n_k - n_q + j and sees keys up to it.
        mask = None
        if n_q > 1:
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        out = F.scaled_dot_product_attention(
            qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),  # (h, t, d)
            attn_mask=mask, scale=scale, enable_gqa=qi.shape[1] != ki.shape[1])
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)


def _decode_padded(q: torch.Tensor, cache: KVCache, block_tables: torch.Tensor, context_lens: list[int],
                   block_size: int, scale: float) -> torch.Tensor:
    """B one-token queries in one SDPA call: contexts gathered padded to the longest, pad masked."""
    max_ctx = max(context_lens)
    tables = block_tables[:, :(max_ctx + block_size - 1) // block_size]  # (B, nb)
    k = cache.k[tables].flatten(1, 2)[:, :max_ctx]  # (B, S, hkv, d)
    v = cache.v[tables].flatten(1, 2)[:, :max_ctx]
    lens = torch.tensor(context_lens, device=q.device)
    mask = torch.arange(max_ctx, device=q.device)[None, :] < lens[:, None]  # (B, S)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),  # (B, h, 1, d), (B, hkv, S, d)
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=q.shape[1] != k.shape[2])
    return out[:, :, 0, :]  # (B, h, d)
