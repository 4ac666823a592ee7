"""The paged attention path against a plain reference, for prefill, chunked prefill and decode in
one batch, through the per-step metadata a paged kernel takes."""

from __future__ import annotations

import random

import torch

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


def test_paged_mixed_batch_equals_reference():
    """One step: a fresh prefill, a chunked prefill after 9 cached tokens, and three decodes (so
    the padded decode call runs), on shuffled, non-contiguous pages."""
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
    cache = KVCache(torch.zeros(40, BLOCK, KV_HEADS, DIM), torch.zeros(40, BLOCK, KV_HEADS, DIM))
    contexts = [(torch.randn(c + n, KV_HEADS, DIM), torch.randn(c + n, KV_HEADS, DIM)) for c, n in zip(cached, new)]
    for (k, v), table, c in zip(contexts, tables, cached):  # what earlier steps wrote
        for p in range(c):
            cache.k[table[p // BLOCK], p % BLOCK] = k[p]
            cache.v[table[p // BLOCK], p % BLOCK] = v[p]

    meta = AttentionMetadata.build(new, [c + n for c, n in zip(cached, new)], tables, BLOCK, torch.device("cpu"))
    assert meta.query_start_loc.tolist() == [0, 7, 12, 13, 14, 15]
    assert meta.seq_lens.tolist() == [7, 14, 13, 4, 21]
    assert meta.slot_mapping.tolist()[7] == tables[1][9 // BLOCK] * BLOCK + 9 % BLOCK  # B's first new token
    assert meta.decode is not None and meta.decode.rows.tolist() == [12, 13, 14]

    q = torch.randn(sum(new), HEADS, DIM)
    k_new = torch.cat([k[c:] for (k, _), c in zip(contexts, cached)])
    v_new = torch.cat([v[c:] for (_, v), c in zip(contexts, cached)])
    out = causal_attention(q, k_new, v_new, meta, cache, DIM ** -0.5)

    lo = 0
    for (k, v), n in zip(contexts, new):
        expected = reference(q[lo:lo + n], k, v)
        torch.testing.assert_close(out[lo:lo + n], expected, atol=1e-5, rtol=1e-5)
        lo += n
    # and the new keys/values went to their slots
    for (k, _), table, c, n in zip(contexts, tables, cached, new):
        p = c + n - 1
        assert torch.equal(cache.k[table[p // BLOCK], p % BLOCK], k[p])


def test_no_cache_equals_reference():
    torch.manual_seed(1)
    lens = [5, 1, 9]
    q, k, v = torch.randn(15, HEADS, DIM), torch.randn(15, KV_HEADS, DIM), torch.randn(15, KV_HEADS, DIM)
    out = causal_attention(q, k, v, AttentionMetadata.no_cache(lens), None, DIM ** -0.5)
    for lo, n in zip([0, 5, 6], lens):
        torch.testing.assert_close(out[lo:lo + n], reference(q[lo:lo + n], k[lo:lo + n], v[lo:lo + n]),
                                   atol=1e-5, rtol=1e-5)
