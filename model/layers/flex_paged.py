"""Paged attention with PyTorch's FlexAttention: the CUDA backend, reading the KV cache in place.

Why FlexAttention (the README's GPU section has the whole argument): it ships inside PyTorch, so a
bare GPU machine needs nothing more; it takes a block-sparse mask whose KV blocks can be the cache's
own pages; GQA is native (`enable_gqa`); and it also runs on CPU, so the CPU tests call the very
kernel entry point and block masks that CUDA gets. FlashInfer and FlashAttention's varlen API are
CUDA-only wheels that nothing here could test.

The cache (num_blocks, block_size, hkv, d) is viewed as one key/value sequence of every slot,
(1, hkv, num_blocks * block_size, d), and a `BlockMask` with KV blocks of one page says which pages
each block of queries reads. A step is at most two kernel calls:

- decode: the single-token sequences, one batch row each (the cache broadcast over the batch). A
  row reads its table's pages, all but the last as whole blocks (no mask evaluated), the last up to
  the context length;
- prefill: the other sequences' new tokens packed in one row, in query blocks of `Q_BLOCK`. A query
  block reads the pages of the sequences it holds, up to its last position. Where one sequence
  fills a block, pages wholly before its first query are whole blocks. Elsewhere the mask keeps a
  query to its own sequence's pages (through a page -> position-in-table map per sequence, since
  the prefix cache shares pages between sequences) and to positions at or before its own.

The layout's host parts travel in the step's one metadata copy; the block masks are made from them
on the device, once per step, on the first layer's call.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex_module
from torch.nn.attention.flex_attention import BlockMask, flex_attention

Q_BLOCK = 128  # queries per block of the prefill mask (FlexAttention's default block)

# Eager FlexAttention is a reference implementation that scores every slot of the cache; serving
# always compiles it. Tests of the block masks may switch this off to run small cases fast.
COMPILE = True


# Dynamo compiles a function again for each new set of static shapes, up to a recompile limit
# (8 by default); past it, the call silently runs eager FlexAttention, which scores every slot of the
# cache. Each kernel gets this limit: the decode kernel sees one shape per power-of-two bucket of
# rows (`decode_rows`), and 16 buckets cover 32k sequences.
RECOMPILE_LIMIT = 16


def _decode_attention(q, k, v, block_mask, scale, enable_gqa, kernel_options):
    """flex_attention under a code object of its own, so that decode has its own Dynamo cache."""
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                          kernel_options=kernel_options)


@functools.cache
def _compiled_kernel(kind: str, device_type: str):
    """Decode and prefill compile apart, each with its own Dynamo cache and recompile count.

    Decode compiles static shapes everywhere: its calls come in a few bucketed shapes, and Inductor
    picks its flex-decoding kernel (split over the keys, a GQA group's query heads sharing one read
    of the cache) only for a static batch. Prefill varies freely in length, so CUDA compiles it
    for dynamic sizes after the first recompile (the default); the CPU kernel template fails to
    build with dynamic sizes (PyTorch 2.13), so CPU compiles each prefill shape as it comes."""
    options = {"dynamic": False if kind == "decode" or device_type == "cpu" else None}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        options["recompile_limit"] = RECOMPILE_LIMIT
    else:  # older PyTorch has only the process-wide limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(_decode_attention if kind == "decode" else flex_attention, **options)


# Inductor takes its flex-decoding kernel for any query shorter than 128 rows with a static batch,
# which a packed prefill of a few dozen tokens is (batch 1). That kernel tiles the query rows times
# the GQA group (next power of two) and keeps only tiles that divide the mask's 128-query blocks, so
# from 33 tokens at Pixtral-12B's 4 query heads per KV head (65 on the tiny test models' 2) it has
# no config left and the compile fails ("No choices to select"; PyTorch 2.11 and 2.13 alike, read
# from their source: CPU lowers FlexAttention elsewhere and never meets it). Prefill therefore asks
# for the general kernel; decode keeps Inductor's choice. PyTorch before `BACKEND` has the older knob.
_KNOWN_OPTIONS = getattr(getattr(flex_module, "FlexKernelOptions", None), "__annotations__", {})
GENERAL_KERNEL = {"BACKEND": "TRITON"} if "BACKEND" in _KNOWN_OPTIONS else {"FORCE_USE_FLEX_ATTENTION": True}


def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
           kind: str = "prefill") -> torch.Tensor:
    fn = _compiled_kernel(kind, q.device.type) if COMPILE else flex_attention
    options = {} if kind == "decode" else dict(GENERAL_KERNEL)  # on CPU too, where it changes nothing
    if q.device.type == "cuda" and block_mask.BLOCK_SIZE[1] < 64:
        # The kernels' tile of keys must divide a KV block (a page); the prefill kernel's default tiles are 64+.
        options["BLOCK_N"] = block_mask.BLOCK_SIZE[1]
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
              kernel_options=options or None)


def decode_rows(n: int) -> int:
    """The rows a decode kernel call runs with: `n` rounded up to a power of two. The extra rows read
    no pages (their output is zero and dropped), so they cost almost nothing, and the compiled
    decode kernel meets at most one static shape per bucket."""
    return 1 << (n - 1).bit_length()


def host_sections(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                  block_size: int, starts: list[int]) -> tuple[dict[str, list[int]], int]:
    """The step's FlexAttention layout as integer lists for the metadata copy, and the width of the
    prefill mask's page lists. `starts`: where each sequence's new tokens start (and the total)."""
    decodes = [i for i, n in enumerate(query_lens) if n == 1]
    prefills = [i for i, n in enumerate(query_lens) if n > 1]
    sections = {"flex_decode_seqs": decodes, "flex_prefill_seqs": prefills,
                "flex_prefill_rows": [r for i in prefills for r in range(starts[i], starts[i + 1])],
                "flex_q_seq": [s for s, i in enumerate(prefills) for _ in range(query_lens[i])],
                "flex_q_pos": [p for i in prefills for p in range(context_lens[i] - query_lens[i], context_lens[i])],
                "flex_prefill_pages": [-(-context_lens[i] // block_size) for i in prefills]}
    # one row of pages per query block of the packed prefill tokens, from each sequence's run of
    # packed tokens (offsets) rather than token by token: a chunk of 8k tokens is 64 blocks
    offsets = [0]
    for i in prefills:
        offsets.append(offsets[-1] + query_lens[i])
    full_rows, part_rows = [], []
    s0 = 0  # the first sequence with tokens in the block
    for lo in range(0, offsets[-1], Q_BLOCK):
        hi = min(lo + Q_BLOCK, offsets[-1])
        while offsets[s0 + 1] <= lo:
            s0 += 1
        spans = []  # (sequence, its first and last position in this block)
        s = s0
        while s < len(prefills) and offsets[s] < hi:
            shift = context_lens[prefills[s]] - query_lens[prefills[s]] - offsets[s]  # packed index -> position
            spans.append((s, shift + max(lo, offsets[s]), shift + min(hi, offsets[s + 1]) - 1))
            s += 1
        whole = len(spans) == 1
        full, part = [], []
        for s, first, last in spans:
            table = block_tables[prefills[s]]
            n_full = (first + 1) // block_size if whole else 0  # pages every query of the block sees whole
            full += table[:n_full]
            part += table[n_full:last // block_size + 1]
        full_rows.append(full)
        part_rows.append(list(dict.fromkeys(part)))  # a page shared by two sequences is read once
    width = max([len(r) for r in full_rows + part_rows] + [1])
    sections["flex_full_num"] = [len(r) for r in full_rows]
    sections["flex_full_idx"] = [b for r in full_rows for b in r + [0] * (width - len(r))]
    sections["flex_part_num"] = [len(r) for r in part_rows]
    sections["flex_part_idx"] = [b for r in part_rows for b in r + [0] * (width - len(r))]
    return sections, width


@dataclass
class FlexLayout:
    """The step's layout on the device (views of the metadata copy); `masks` builds the block masks."""

    on_device: dict[str, torch.Tensor]
    width: int
    block_tables: torch.Tensor  # (B, pages)
    seq_lens: torch.Tensor  # (B,)
    query_start_loc: torch.Tensor  # (B+1,)
    block_size: int
    _masks: dict[str, tuple[torch.Tensor, BlockMask]] = field(default_factory=dict)

    def masks(self, cache_blocks: int) -> dict[str, tuple[torch.Tensor, BlockMask]]:
        """{"decode" / "prefill": (rows of the flat batch, block mask)} over a cache of `cache_blocks`
        pages; made on the first call of the step."""
        if not self._masks:
            if self.on_device["flex_decode_seqs"].numel():
                self._masks["decode"] = self._decode_mask(cache_blocks)
            if self.on_device["flex_prefill_seqs"].numel():
                self._masks["prefill"] = self._prefill_mask(cache_blocks)
        return self._masks

    def _columns(self, indices: torch.Tensor, cache_blocks: int, whole: bool = False) -> torch.Tensor:
        """Page lists as int32, padded to the whole cache where `whole` or on CPU (the width CPU's
        kernel asks for; a static width for the decode kernel's static shapes)."""
        if whole or indices.device.type == "cpu":
            indices = F.pad(indices, (0, cache_blocks - indices.shape[-1]))
        return indices.to(torch.int32).contiguous()

    def _decode_mask(self, cache_blocks: int) -> tuple[torch.Tensor, BlockMask]:
        """The decode rows' mask, over `decode_rows` rows: the rows past the step's sequences have
        no pages."""
        seqs = self.on_device["flex_decode_seqs"]
        bs, extra = self.block_size, decode_rows(seqs.shape[0]) - seqs.shape[0]
        lens = F.pad(self.seq_lens[seqs], (0, extra))
        tables = F.pad(self.block_tables[seqs], (0, 0, 0, extra))
        pages = (lens + bs - 1) // bs  # 0 for the extra rows
        logical = _logical_pages(tables, pages, cache_blocks)

        def in_context(b, h, q_idx, kv_idx):
            place = logical[b, kv_idx // bs]
            return (place >= 0) & (place * bs + kv_idx % bs < lens[b])

        mask = BlockMask.from_kv_blocks(
            (pages > 0)[:, None, None].to(torch.int32),  # the last page, masked to the context length
            self._columns(tables.gather(1, (pages - 1).clamp(min=0)[:, None])[:, None, None, :], cache_blocks,
                          whole=True),
            (pages - 1).clamp(min=0)[:, None, None].to(torch.int32),  # the pages before it, whole
            self._columns(tables[:, None, None, :], cache_blocks, whole=True),
            BLOCK_SIZE=(Q_BLOCK, bs), mask_mod=in_context, seq_lengths=(1, cache_blocks * bs),
            compute_q_blocks=False)
        return self.query_start_loc[seqs], mask

    def _prefill_mask(self, cache_blocks: int) -> tuple[torch.Tensor, BlockMask]:
        d, bs, width = self.on_device, self.block_size, self.width
        logical = _logical_pages(self.block_tables[d["flex_prefill_seqs"]], d["flex_prefill_pages"], cache_blocks)
        q_seq, q_pos = d["flex_q_seq"], d["flex_q_pos"]

        def own_causal(b, h, q_idx, kv_idx):
            place = logical[q_seq[q_idx], kv_idx // bs]
            return (place >= 0) & (place * bs + kv_idx % bs <= q_pos[q_idx])

        n_blocks = d["flex_part_num"].shape[0]
        mask = BlockMask.from_kv_blocks(
            d["flex_part_num"].to(torch.int32)[None, None],
            self._columns(d["flex_part_idx"].view(1, 1, n_blocks, width), cache_blocks),
            d["flex_full_num"].to(torch.int32)[None, None],
            self._columns(d["flex_full_idx"].view(1, 1, n_blocks, width), cache_blocks),
            BLOCK_SIZE=(Q_BLOCK, bs), mask_mod=own_causal, seq_lengths=(q_seq.shape[0], cache_blocks * bs),
            compute_q_blocks=False)
        return d["flex_prefill_rows"], mask


def _logical_pages(tables: torch.Tensor, pages: torch.Tensor, cache_blocks: int) -> torch.Tensor:
    """(S, cache_blocks + 1): each physical page's place in sequence s's table, -1 where s does not
    hold it. The masks test membership with it, so that each mask alone is the whole truth and the
    block lists only prune (eager FlexAttention applies the mask alone)."""
    n_seqs, n_cols = tables.shape
    places = torch.arange(n_cols, device=tables.device)
    columns = torch.where(places[None, :] < pages[:, None], tables, cache_blocks)  # padding: a dummy column
    logical = torch.full((n_seqs, cache_blocks + 1), -1, dtype=torch.int32, device=tables.device)
    return logical.scatter_(1, columns, places.to(torch.int32).expand(n_seqs, n_cols).contiguous())


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: FlexLayout,
                    scale: float) -> torch.Tensor:
    """q: (T, h, d), the step's queries; keys/values: one layer's cache (num_blocks, block_size, hkv, d)
    with this step's keys already in their slots -> (T, h, d)."""
    cache_k = keys.view(1, -1, *keys.shape[2:]).transpose(1, 2)  # (1, hkv, slots, d)
    cache_v = values.view(1, -1, *values.shape[2:]).transpose(1, 2)
    out = torch.empty_like(q)
    masks = layout.masks(keys.shape[0])
    if "decode" in masks:
        rows, mask = masks["decode"]
        n = rows.shape[0]
        padded = F.pad(q[rows], (0, 0, 0, 0, 0, decode_rows(n) - n))  # (rows, h, d): zero queries past n
        out[rows] = kernel(padded[:, :, None, :], cache_k, cache_v, mask, scale, "decode")[:n, :, 0, :]
    if "prefill" in masks:
        rows, mask = masks["prefill"]
        packed = q[rows].transpose(0, 1)[None]  # (1, h, P, d)
        out[rows] = kernel(packed, cache_k, cache_v, mask, scale, "prefill")[0].transpose(0, 1)
    return out


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: list[int],
                            scale: float) -> torch.Tensor:
    """Without a cache (the profiling pass): each sequence of the packed batch attends causally to
    its own new tokens.

    The block lists are made on the host: a query block reads the key blocks from the one holding
    the start of its first token's sequence up to itself. `create_block_mask` would evaluate the
    mask at every (query, key) pair instead, about 0.7 GB at 8,192 tokens, which the profiling
    pass would count as activation memory and take from the KV cache."""
    t = q.shape[0]
    owner, first_token = [], []  # per token: its sequence, and where that sequence starts
    for seq, n in enumerate(query_lens):
        owner += [seq] * n
        first_token += [len(first_token)] * n
    firsts = [first_token[lo] // Q_BLOCK for lo in range(0, t, Q_BLOCK)]  # per query block: its first key block
    n_blocks = len(firsts)
    blocks = [list(range(first, b + 1)) for b, first in enumerate(firsts)]
    host = torch.tensor(owner + [len(r) for r in blocks] + [i for r in blocks for i in r + [0] * (n_blocks - len(r))])
    doc, counts, indices = host.to(q.device).split([t, n_blocks, n_blocks * n_blocks])  # one copy

    def same_seq_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    mask = BlockMask.from_kv_blocks(counts.to(torch.int32)[None, None],
                                    indices.to(torch.int32).view(1, 1, n_blocks, n_blocks),
                                    BLOCK_SIZE=Q_BLOCK, mask_mod=same_seq_causal, seq_lengths=(t, t),
                                    compute_q_blocks=False)
    out = kernel(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scale)
    return out[0].transpose(0, 1)
