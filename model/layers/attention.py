"""Attention over ragged batches of sequences, with or without a paged KV cache.

A batch is a flat list of tokens from several sequences. Without a cache each sequence attends
causally to its own tokens. With a cache, new keys/values are first written to their slots, and
each sequence then attends to its whole context read through its block table: the same code
serves prefill, chunked prefill and decode, mixed in one batch.

The boundary between the model and an attention kernel is `AttentionMetadata`: what a paged
kernel takes (query start offsets, context lengths, block tables, slot mapping), built once per
step on the host and copied to the device in one transfer, then read by every layer. The backend
is chosen by device (`backend_for`): CUDA runs FlexAttention over the cache in place
(`model/layers/flex_paged.py`); CPU runs `torch_paged_attention`, which gathers each context
through the same metadata and calls SDPA, faster on CPU than FlexAttention's CPU kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from model.layers import flex_paged


@dataclass
class KVCache:
    """One layer's cache: (num_blocks, block_size, n_kv_heads, head_dim) for keys and values."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class DecodeLayout:
    """The single-token sequences of a step, attended in one padded SDPA call."""

    rows: torch.Tensor  # (D,) their rows in the flat batch
    tables: torch.Tensor  # (D, pages) their block tables, cut to the longest context's pages
    valid: torch.Tensor  # (D, S) which of the S gathered slots hold context (not padding)
    max_context: int


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence, in batch order (host)
    context_lens: list[int]  # tokens per sequence after this step, cached + new (host)
    block_size: int = 0
    backend: str = "torch"  # a key of BACKENDS
    # device tensors, all from one host-to-device copy
    query_start_loc: torch.Tensor | None = None  # (B+1,) where each sequence's new tokens start
    seq_lens: torch.Tensor | None = None  # (B,) = context_lens
    block_tables: torch.Tensor | None = None  # (B, max_pages) KV pages per sequence, padded with 0
    slot_mapping: torch.Tensor | None = None  # (T,) cache slot of every new token
    # what torch_paged_attention reads, derived once per step from the same host lists
    decode: DecodeLayout | None = None
    prefills: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # (lo, hi, context slots)
    flex: flex_paged.FlexLayout | None = None  # what the FlexAttention backend reads
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the caller's sections of the copy

    @staticmethod
    def no_cache(query_lens: list[int], backend: str = "torch") -> "AttentionMetadata":
        return AttentionMetadata(query_lens=list(query_lens), context_lens=list(query_lens), backend=backend)

    @staticmethod
    def build(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device, extra: dict[str, list[int]] | None = None,
              backend: str = "torch") -> "AttentionMetadata":
        """The step's metadata from host lists, laid out for `backend`; `extra` (say token ids and
        positions) rides along in the same copy and comes back in `.extra`."""
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        width = max(len(t) for t in block_tables)
        sections: dict[str, list[int]] = {
            "query_start_loc": starts,
            "seq_lens": list(context_lens),
            "slot_mapping": [slot for table, n, ctx in zip(block_tables, query_lens, context_lens)
                             for slot in _slots(table, range(ctx - n, ctx), block_size)],
            "block_tables": [b for t in block_tables for b in t + [0] * (width - len(t))],
        }
        flex_width = 0
        if backend == "flex":
            flex_sections, flex_width = flex_paged.host_sections(query_lens, context_lens, block_tables, block_size,
                                                                starts)
            sections.update(flex_sections)
        # torch: one padded call for all single-token queries (when there are several), one SDPA
        # call per other sequence over its context's slots
        decodes = [i for i, n in enumerate(query_lens) if n == 1] if backend == "torch" else []
        if len(decodes) < 2:
            decodes = []
        max_ctx = max((context_lens[i] for i in decodes), default=0)
        pages = -(-max_ctx // block_size) if decodes else 0
        if decodes:
            sections["decode_rows"] = [starts[i] for i in decodes]
            sections["decode_tables"] = [b for i in decodes for b in (block_tables[i] + [0] * pages)[:pages]]
            sections["decode_lens"] = [context_lens[i] for i in decodes]
        in_decode = set(decodes)
        prefill_seqs = [i for i in range(len(query_lens)) if i not in in_decode] if backend == "torch" else []
        for i in prefill_seqs:
            sections[f"context_slots{i}"] = _slots(block_tables[i], range(context_lens[i]), block_size)
        sections.update({f"extra:{k}": v for k, v in (extra or {}).items()})
        on_device = copy_to_device(sections, device)
        meta = AttentionMetadata(
            query_lens=list(query_lens), context_lens=list(context_lens), block_size=block_size, backend=backend,
            query_start_loc=on_device["query_start_loc"], seq_lens=on_device["seq_lens"],
            block_tables=on_device["block_tables"].view(len(block_tables), width),
            slot_mapping=on_device["slot_mapping"],
            prefills=[(starts[i], starts[i + 1], on_device[f"context_slots{i}"]) for i in prefill_seqs],
            extra={k.removeprefix("extra:"): v for k, v in on_device.items() if k.startswith("extra:")})
        if backend == "flex":
            meta.flex = flex_paged.FlexLayout(
                {k: v for k, v in on_device.items() if k.startswith("flex_")}, flex_width, meta.block_tables,
                meta.seq_lens, meta.query_start_loc, block_size)
        if decodes:
            lens = on_device["decode_lens"]
            meta.decode = DecodeLayout(
                rows=on_device["decode_rows"], tables=on_device["decode_tables"].view(len(decodes), pages),
                valid=torch.arange(max_ctx, device=device)[None, :] < lens[:, None], max_context=max_ctx)
        return meta


def _slots(table: list[int], positions: range, block_size: int) -> list[int]:
    """Cache slots of a sequence's positions: page table[p // block_size], offset p % block_size."""
    return [table[p // block_size] * block_size + p % block_size for p in positions]


def copy_to_device(sections: dict[str, list[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Integer lists -> int64 tensors on `device`, in one transfer (pinned and asynchronous on CUDA):
    views of one buffer."""
    flat = [x for values in sections.values() for x in values]
    host = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(device, non_blocking=True)
    return dict(zip(sections, packed.split([len(v) for v in sections.values()])))


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, "KVCache | None", float],
                       torch.Tensor]


BACKEND_ENV = "PIXTRAL_SERVE_ATTENTION"


def backend_for(device: torch.device) -> str:
    """The attention backend for a device: FlexAttention on CUDA, the torch one elsewhere;
    PIXTRAL_SERVE_ATTENTION=torch|flex overrides."""
    chosen = os.environ.get(BACKEND_ENV) or ("flex" if device.type == "cuda" else "torch")
    if chosen not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={chosen!r}: expected one of {sorted(BACKENDS)}")
    return chosen


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                     cache: KVCache | None, scale: float) -> torch.Tensor:
    """q: (T, n_heads, d); k, v: (T, n_kv_heads, d) for the new tokens -> (T, n_heads, d)."""
    return BACKENDS[meta.backend](q, k, v, meta, cache, scale)


def _write_slots(k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, cache: KVCache) -> None:
    """The step's new keys and values into their cache slots."""
    cache.k.view(-1, *cache.k.shape[2:]).index_copy_(0, meta.slot_mapping, k)
    cache.v.view(-1, *cache.v.shape[2:]).index_copy_(0, meta.slot_mapping, v)


def flex_attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                           cache: KVCache | None, scale: float) -> torch.Tensor:
    """FlexAttention reading the cache in place through block masks of its pages."""
    if cache is None:
        return flex_paged.packed_causal_attention(q, k, v, meta.query_lens, scale)
    _write_slots(k, v, meta, cache)
    return flex_paged.paged_attention(q, cache.k, cache.v, meta.flex, scale)


def torch_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                          cache: KVCache | None, scale: float) -> torch.Tensor:
    """SDPA over each context gathered from the cache through the metadata's slots."""
    if cache is None:
        return _attend_segments(q, k.split(meta.query_lens), v.split(meta.query_lens), meta.query_lens, scale)
    _write_slots(k, v, meta, cache)
    flat_k = cache.k.view(-1, *cache.k.shape[2:])  # (slots, hkv, d)
    flat_v = cache.v.view(-1, *cache.v.shape[2:])
    out = torch.empty_like(q)
    if meta.decode is not None:
        out[meta.decode.rows] = _decode_padded(q[meta.decode.rows], cache, meta.decode, scale)
    for lo, hi, slots in meta.prefills:
        # index_select, not flat_k[slots]: on CPU, advanced indexing into the whole cache took
        # 0.5-3 ms for a few rows (growing with the cache) against ~10 us
        out[lo:hi] = _attend_segments(q[lo:hi], [flat_k.index_select(0, slots)], [flat_v.index_select(0, slots)],
                                      [hi - lo], scale)
    return out


def _attend_segments(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                     query_lens: list[int], scale: float) -> torch.Tensor:
    """One SDPA call per sequence: its new queries against its whole context (causal).

    The tensors are 4-D (a batch of one) because PyTorch's fused CPU kernel takes only 4-D input.
    3-D falls to the math backend: measured on this project's 2-core CPU, 2.4x-4.9x slower for a
    1k-4k-token prompt and 3.4x-7x for one decode token over a 1k-4k context.
    """
    outs = []
    for qi, ki, vi in zip(q.split(query_lens), ks, vs):
        n_q, n_k = qi.shape[0], ki.shape[0]
        # Query j sits at context position n_k - n_q + j and sees keys up to it. SDPA's is_causal
        # aligns the first query with the first key, right only when the context is all new.
        mask = None
        if 1 < n_q < n_k:
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
        out = F.scaled_dot_product_attention(
            qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],  # (1, h, t, d)
            attn_mask=mask, is_causal=1 < n_q == n_k, scale=scale, enable_gqa=qi.shape[1] != ki.shape[1])
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def _decode_padded(q: torch.Tensor, cache: KVCache, decode: DecodeLayout, scale: float) -> torch.Tensor:
    """D one-token queries in one SDPA call: contexts gathered padded to the longest, pad masked."""
    rows = decode.tables.shape[0]
    # (D, S, hkv, d); index_select for the reason torch_paged_attention gives (25x at 32 rows)
    k = cache.k.index_select(0, decode.tables.flatten()).view(rows, -1, *cache.k.shape[2:])[:, :decode.max_context]
    v = cache.v.index_select(0, decode.tables.flatten()).view(rows, -1, *cache.v.shape[2:])[:, :decode.max_context]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),  # (D, h, 1, d), (D, hkv, S, d)
        attn_mask=decode.valid[:, None, None, :], scale=scale, enable_gqa=q.shape[1] != k.shape[2])
    return out[:, :, 0, :]  # (D, h, d)


BACKENDS: dict[str, AttentionFn] = {"torch": torch_paged_attention, "flex": flex_attention_backend}
