"""Decode steps on static buffers, captured as CUDA graphs at a set of batch sizes.

A decode step's host work (Python, kernel launches: hundreds per layer stack) costs more than its
GPU work at small batches. A CUDA graph replays the whole forward with one launch, but only on
the exact tensors it was captured with. So each batch size owns static input buffers (token ids,
positions, context lengths, slots, block tables at a fixed width of pages) and a static logits
buffer; a step copies its values into the inputs (one host-to-device copy), replays, and reads the
logits of its real rows. Rows past the step's sequences are padding: token 0 at position 0 on the
runner's scratch page, never sampled.

The forward inside is the FlexAttention backend's, with block masks made on the device from the
static tables, so the masks are recorded in the graph too. On CPU nothing is captured: the same
static-buffer forward runs as a function, which is how the CPU tests show it equals eager.
"""

from __future__ import annotations

import logging

import torch

from model.layers.attention import AttentionMetadata, KVCache
from model.layers.flex_paged import FlexLayout
from model.pixtral import PixtralModel

log = logging.getLogger(__name__)


class _StaticDecode:
    """One batch size: its input buffer, its forward, and (on CUDA) its captured graph."""

    def __init__(self, model: PixtralModel, kv_caches: list[KVCache], size: int, pages: int, block_size: int,
                 scratch_block: int) -> None:
        self.model, self.kv_caches, self.size, self.pages, self.block_size = model, kv_caches, size, pages, block_size
        device = model.tok_embeddings.weight.device
        # sections: tokens, positions, seq_lens, slot_mapping (size each), then the tables (size x pages)
        self.inputs = torch.zeros(size * (4 + pages), dtype=torch.int64, device=device)
        tokens, positions, seq_lens, slots, tables = self.inputs.split([size] * 4 + [size * pages])
        self.tokens, self.positions, self.seq_lens, self.slots = tokens, positions, seq_lens, slots
        self.tables = tables.view(size, pages)
        self.rows = torch.arange(size, device=device)
        self.padding_row = (0, 0, 1, scratch_block * block_size, [scratch_block])
        # The host side of the step's one copy, kept from step to step. A step writes only its rows'
        # own pages: the tables are `pages` wide for the longest context the model allows (8,192
        # pages at 131k tokens), and rebuilding them whole cost 12 ms a step at 16 rows on this CPU.
        # Entries past a row's context stay from earlier steps and are never read: the masks take
        # a row's pages from its context length alone (flex_paged._logical_pages).
        self.host = self.inputs if device.type == "cpu" else torch.zeros_like(self.inputs, device="cpu").pin_memory()
        self.host_values = self.host.numpy()
        self.copied: torch.cuda.Event | None = None  # the last copy out of `host`, on CUDA
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        """The decode forward over the static buffers -> (size, vocab) logits."""
        layout = FlexLayout({"flex_decode_seqs": self.rows, "flex_prefill_seqs": self.rows[:0]}, 0,
                            self.tables, self.seq_lens, self.rows, self.block_size)
        meta = AttentionMetadata(query_lens=[1] * self.size, context_lens=[], block_size=self.block_size,
                                 backend="flex", query_start_loc=self.rows, seq_lens=self.seq_lens,
                                 block_tables=self.tables, slot_mapping=self.slots, flex=layout)
        x = self.model.embed(self.tokens, None, self.rows[:0])  # no image rows: nothing waits on the device
        hidden = self.model(x, self.positions, meta, self.kv_caches)
        return self.model.compute_logits(hidden)

    def capture(self, pool) -> None:
        """Warm up (compiles, allocator) on a side stream, then record the forward."""
        self.load([self.padding_row] * self.size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self.forward()

    def load(self, rows: list[tuple]) -> None:
        """Rows of (token, position, context length, slot, pages) into the buffers, in one copy."""
        if self.copied is not None:
            self.copied.synchronize()  # the last copy has read `host` (long since: a step's sampling waits)
        size, pages, host = self.size, self.pages, self.host_values
        rows = rows + [self.padding_row] * (size - len(rows))
        for k in range(4):
            host[k * size:(k + 1) * size] = [row[k] for row in rows]
        for i, row in enumerate(rows):
            start = 4 * size + i * pages
            host[start:start + len(row[4])] = row[4]
        if self.host is not self.inputs:
            self.inputs.copy_(self.host, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    def run(self, rows: list[tuple]) -> torch.Tensor:
        self.load(rows)
        if self.graph is None:
            return self.forward()[:len(rows)]
        self.graph.replay()
        return self.logits[:len(rows)]


class DecodeGraphs:
    """Static decode forwards at `batch_sizes`, with block tables `pages` wide; captured as CUDA
    graphs when `capture` (a failed capture logs why and leaves that size to run eagerly)."""

    def __init__(self, model: PixtralModel, kv_caches: list[KVCache], batch_sizes: list[int], pages: int,
                 block_size: int, scratch_block: int, capture: bool) -> None:
        self.block_size, self.pages = block_size, pages
        self.by_size = {b: _StaticDecode(model, kv_caches, b, pages, block_size, scratch_block)
                        for b in sorted(batch_sizes)}
        self.captured = False
        if capture:
            try:
                pool = torch.cuda.graph_pool_handle()
                # Inference mode, as every step runs: the compiled kernels guard on it, so capturing
                # outside it would compile each of them a second time (and record autograd history).
                with torch.inference_mode():
                    for size in sorted(self.by_size, reverse=True):  # the largest first: smaller ones reuse its pool
                        self.by_size[size].capture(pool)
                self.captured = True
            except Exception as exc:  # a capture failure must not stop serving: steps then run eagerly
                reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                if model.tp.world_size > 1:
                    # ...except in a tensor-parallel group: the other ranks would go on capturing
                    # into collectives this rank never joins, and hang until the group's timeout
                    raise RuntimeError(f"CUDA graph capture failed on rank {model.tp.rank}: {reason}. Set "
                                       "decoder.cuda_graph_batch_sizes to [] to decode eagerly") from exc
                log.warning("CUDA graph capture failed, decoding eagerly: %s", reason)
                for entry in self.by_size.values():
                    entry.graph = None

    def size_for(self, batch: int, max_context: int) -> int | None:
        """The smallest static size that holds `batch` sequences of up to `max_context` tokens."""
        if -(-max_context // self.block_size) > self.pages:
            return None
        return next((b for b in self.by_size if b >= batch), None)

    def run(self, size: int, chunks) -> torch.Tensor:
        """Logits (len(chunks), vocab) of one-token chunks (SeqChunk) on the static size `size`."""
        bs = self.block_size
        rows = []
        for c in chunks:
            pos, table = c.start, c.block_table[:self.pages]  # pages past the context are never read
            rows.append((c.token_ids[0], pos, pos + 1, table[pos // bs] * bs + pos % bs, table))
        return self.by_size[size].run(rows)
