"""The paged attention path against a plain reference, for prefill, chunked prefill and decode in
one batch, through the per-step metadata a paged kernel takes."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.layers import flex_paged
from model.layers.attention import AttentionMetadata, KVCache, causal_attention

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q: (n, h, d) the last n positions of a context with keys/values k, v: (ctx, hkv, d); float64,
    each query head reading its group's key/value head, causal."""
    n, ctx = q.shape[0], k.shape[0]
    group = HEADS // KV_HEADS
    k, v = k.double().repeat_interleave(group, dim=1), v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * DIM ** -0.5
    visible = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]  # (n, ctx)
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


def mixed_step(shared_prefix: bool = False):
    """A fresh prefill, a chunked prefill after 9 cached tokens, and three decodes, on shuffled,
    non-contiguous pages. With `shared_prefix`, the chunked prefill's first two pages are also the
    first two of the last decode's table, as the prefix cache shares them (same keys there)."""
    torch.manual_seed(0)
    rng = random.Random(0)
    cached = [0, 9, 12, 3, 20]  # tokens already in the cache, per sequence
    new = [7, 5, 1, 1, 1]  # tokens of this step
    pages = list(range(1, 40))
    rng.shuffle(pages)
    tables = []
    for c, n in zip(cached, new):
        need = -(-(c + n) // BLOCK)
        tables.append([pages.pop() for _ in range(need)])
    contexts = [(torch.randn(c + n, KV_HEADS, DIM), torch.randn(c + n, KV_HEADS, DIM)) for c, n in zip(cached, new)]
    if shared_prefix:
        tables[4][:2] = tables[1][:2]
        for t in (0, 1):
            contexts[4][t][:2 * BLOCK] = contexts[1][t][:2 * BLOCK]
    cache = KVCache(torch.zeros(40, BLOCK, KV_HEADS, DIM), torch.zeros(40, BLOCK, KV_HEADS, DIM))
    for (k, v), table, c in zip(contexts, tables, cached):  # what earlier steps wrote
        for p in range(c):
            cache.k[table[p // BLOCK], p % BLOCK] = k[p]
            cache.v[table[p // BLOCK], p % BLOCK] = v[p]
    return cached, new, tables, contexts, cache


def attend_and_check(meta: AttentionMetadata, cached: list[int], new: list[int], contexts: list, cache: KVCache) -> None:
    """One step's attention through `meta` (the step's new keys/values written to the cache) equals
    the float64 reference, sequence by sequence."""
    q = torch.randn(sum(new), HEADS, DIM)
    k_new = torch.cat([k[c:] for (k, _), c in zip(contexts, cached)])
    v_new = torch.cat([v[c:] for (_, v), c in zip(contexts, cached)])
    out = causal_attention(q, k_new, v_new, meta, cache, DIM ** -0.5)
    lo = 0
    for (k, v), n in zip(contexts, new):
        torch.testing.assert_close(out[lo:lo + n], reference(q[lo:lo + n], k, v), atol=1e-5, rtol=1e-5)
        lo += n


@pytest.mark.parametrize("backend,compiled,shared_prefix", [
    ("torch", False, False), ("torch", False, True), ("flex", False, False), ("flex", False, True),
    ("flex", True, True)])
def test_paged_mixed_batch_equals_reference(backend, compiled, shared_prefix, monkeypatch):
    """One step of every kind through the per-step metadata, against a float64 reference.

    The flex backend uses query blocks of 4 tokens here, so that the prefill mask has both
    one-sequence blocks (with whole pages) and blocks shared by two sequences. Eager FlexAttention
    applies the mask functions alone; the compiled kernel (the one serving runs) reads only the
    pages the block lists name, and skips the mask on whole pages, so it also checks the lists."""
    monkeypatch.setattr(flex_paged, "COMPILE", compiled)
    monkeypatch.setattr(flex_paged, "Q_BLOCK", 4)
    cached, new, tables, contexts, cache = mixed_step(shared_prefix)
    meta = AttentionMetadata.build(new, [c + n for c, n in zip(cached, new)], tables, BLOCK, torch.device("cpu"),
                                   backend=backend)
    assert meta.query_start_loc.tolist() == [0, 7, 12, 13, 14, 15]
    assert meta.seq_lens.tolist() == [7, 14, 13, 4, 21]
    assert meta.slot_mapping.tolist()[7] == tables[1][9 // BLOCK] * BLOCK + 9 % BLOCK  # B's first new token
    if backend == "torch":
        assert meta.decode is not None and meta.decode.rows.tolist() == [12, 13, 14]
    else:
        masks = meta.flex.masks(cache.k.shape[0])
        assert masks["decode"][0].tolist() == [12, 13, 14] and masks["prefill"][0].tolist() == list(range(12))
        d = meta.flex.on_device
        # query blocks of 4 over the 12 prefill tokens: A's positions 0-3; A's 4-6 with B's 9; B's 10-13.
        # The last is B's alone, and its queries see B's first two pages whole.
        assert d["flex_full_num"].tolist() == [0, 0, 2]
        assert d["flex_part_num"].tolist() == [1, 2 + 3, 2]

    attend_and_check(meta, cached, new, contexts, cache)
    # and the new keys/values went to their slots
    for (k, _), table, c, n in zip(contexts, tables, cached, new):
        p = c + n - 1
        assert torch.equal(cache.k[table[p // BLOCK], p % BLOCK], k[p])


@pytest.mark.parametrize("backend,compiled", [("torch", False), ("flex", False), ("flex", True)])
def test_no_cache_equals_reference(backend, compiled, monkeypatch):
    """Without a cache (the profiling pass's forward): each sequence causal over its own tokens.
    The flex backend uses blocks of 4 here, so that sequences span blocks and share them."""
    monkeypatch.setattr(flex_paged, "COMPILE", compiled)
    monkeypatch.setattr(flex_paged, "Q_BLOCK", 4)
    torch.manual_seed(1)
    lens = [5, 1, 9]
    q, k, v = torch.randn(15, HEADS, DIM), torch.randn(15, KV_HEADS, DIM), torch.randn(15, KV_HEADS, DIM)
    out = causal_attention(q, k, v, AttentionMetadata.no_cache(lens, backend), None, DIM ** -0.5)
    for lo, n in zip([0, 5, 6], lens):
        torch.testing.assert_close(out[lo:lo + n], reference(q[lo:lo + n], k[lo:lo + n], v[lo:lo + n]),
                                   atol=1e-5, rtol=1e-5)


def test_cpu_backend_takes_the_fused_sdpa_kernel():
    """The torch backend's every SDPA call (a fresh prefill, a chunked prefill, padded decodes, a
    lone decode, no cache) is one PyTorch's fused CPU kernel accepts: with every other SDPA backend
    disabled, none raises, and each still equals the reference. (3-D input, which the math backend
    alone takes, ran 2-7x slower.)"""
    cached, new, tables, contexts, cache = mixed_step()
    steps = [(new, cached, tables, contexts), ([1], [20], [tables[4]], [contexts[4]])]  # the mix; one decode
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        for new, cached, tables, contexts in steps:
            meta = AttentionMetadata.build(new, [c + n for c, n in zip(cached, new)], tables, BLOCK,
                                           torch.device("cpu"))
            attend_and_check(meta, cached, new, contexts, cache)
        q, k, v = torch.randn(9, HEADS, DIM), torch.randn(9, KV_HEADS, DIM), torch.randn(9, KV_HEADS, DIM)
        out = causal_attention(q, k, v, AttentionMetadata.no_cache([9]), None, DIM ** -0.5)
        torch.testing.assert_close(out, reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_prefill_page_lists_follow_their_definition():
    """host_sections works from each sequence's run of packed tokens; this is the definition it
    must match, token by token: a query block reads, for each sequence it holds, the pages up to
    its last position there, and when it holds one sequence alone, the pages wholly before that
    sequence's first position there as whole blocks."""
    rng = random.Random(0)
    for _ in range(300):
        block_size = rng.choice([1, 4, 16])
        query_lens, context_lens, tables, next_page = [], [], [], 0
        for _ in range(rng.randint(1, 8)):
            q = 1 if rng.random() < 0.4 else rng.randint(2, 400)
            query_lens.append(q)
            context_lens.append(q + rng.randint(0, 300))
            pages = -(-context_lens[-1] // block_size)
            tables.append(list(range(next_page, next_page + pages)))
            next_page += pages
            if len(tables) > 1 and rng.random() < 0.3:
                tables[-1][0] = tables[-2][0]  # a prefix page shared with the sequence before
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        sections, width = flex_paged.host_sections(query_lens, context_lens, tables, block_size, starts)
        prefills = sections["flex_prefill_seqs"]
        owners = list(zip(sections["flex_q_seq"], sections["flex_q_pos"]))
        for b, lo in enumerate(range(0, len(owners), flex_paged.Q_BLOCK)):
            block = owners[lo:lo + flex_paged.Q_BLOCK]
            seqs = list(dict.fromkeys(s for s, _ in block))
            full, part = [], []
            for s in seqs:
                positions = [p for t, p in block if t == s]
                n_full = (positions[0] + 1) // block_size if len(seqs) == 1 else 0
                full += tables[prefills[s]][:n_full]
                part += tables[prefills[s]][n_full:positions[-1] // block_size + 1]
            part = list(dict.fromkeys(part))
            row = slice(b * width, (b + 1) * width)
            assert sections["flex_full_num"][b] == len(full) and sections["flex_full_idx"][row][:len(full)] == full
            assert sections["flex_part_num"][b] == len(part) and sections["flex_part_idx"][row][:len(part)] == part


def test_decode_kernel_sees_one_shape_per_bucket_of_rows(monkeypatch):
    """Decode steps of 1 to 9 sequences reach the decode kernel with 1, 2, 4, 8 or 16 rows, and
    static page lists as wide as the cache, so its compiled form meets at most one shape per
    power-of-two bucket and never reaches Dynamo's recompile limit (past which eager FlexAttention,
    scoring every slot of the cache, would run). The rows past the step's sequences read no page,
    and each sequence's output still equals the reference."""
    monkeypatch.setattr(flex_paged, "COMPILE", False)
    shapes = set()
    real_kernel = flex_paged.kernel

    def recording(q, k, v, block_mask, scale, kind="prefill"):
        tensors = (q, block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                   block_mask.full_kv_indices)
        shapes.add((kind,) + tuple(tuple(t.shape) for t in tensors))
        if kind == "decode":
            rows = q.shape[0]
            live = (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).flatten()
            assert rows == flex_paged.decode_rows(rows) and (live[n:] == 0).all() and (live[:n] > 0).all()
        return real_kernel(q, k, v, block_mask, scale, kind)

    monkeypatch.setattr(flex_paged, "kernel", recording)
    torch.manual_seed(3)
    pages = 48
    cache = KVCache(torch.randn(pages, BLOCK, KV_HEADS, DIM), torch.randn(pages, BLOCK, KV_HEADS, DIM))
    flat_k, flat_v = cache.k.view(-1, KV_HEADS, DIM), cache.v.view(-1, KV_HEADS, DIM)
    for n in range(1, 10):
        lens = [1 + (5 * i + n) % 17 for i in range(n)]  # contexts of 1-17 tokens, on distinct pages
        tables = [[5 * i + j for j in range(-(-c // BLOCK))] for i, c in enumerate(lens)]
        meta = AttentionMetadata.build([1] * n, lens, tables, BLOCK, torch.device("cpu"), backend="flex")
        q = torch.randn(n, HEADS, DIM)
        slots = [[t[p // BLOCK] * BLOCK + p % BLOCK for p in range(c)] for t, c in zip(tables, lens)]
        last_k = torch.stack([flat_k[s[-1]] for s in slots])  # the step writes each sequence's last key again
        last_v = torch.stack([flat_v[s[-1]] for s in slots])
        out = causal_attention(q, last_k, last_v, meta, cache, DIM ** -0.5)
        for i, s in enumerate(slots):
            torch.testing.assert_close(out[i:i + 1], reference(q[i:i + 1], flat_k[s], flat_v[s]), atol=1e-5, rtol=1e-5)
    assert {s[1][0] for s in shapes} == {1, 2, 4, 8, 16}
    assert len(shapes) == 5 and all(s[0] == "decode" and s[3][-1] == pages for s in shapes)
