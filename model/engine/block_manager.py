"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, and the prefix cache.

A block's hash chains its parent's hash with its token ids and the content hashes of the images
whose tokens it covers, so two prompts share a block only if everything before and in it is equal
(the [IMG] token id alone would not tell two images apart). Only full blocks whose KV has been
computed are registered, so a hit never points at KV that is still being written. Freed blocks
keep their hash until they are reused (least recently freed first), so a repeated prompt or a
preempted sequence finds its blocks again.
"""

from __future__ import annotations

from collections import OrderedDict

from model.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0, (num_blocks, block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # front = reuse first
        self.hash_to_block: dict[int, int] = {}
        self.block_key: dict[int, tuple[int, tuple[int, ...]]] = {}  # block -> (hash, tokens), to verify hits
        self.prefix_queried_blocks = 0
        self.prefix_hit_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def block_hash(self, seq: Sequence, index: int, parent: int | None) -> tuple[int, tuple[int, ...]]:
        start, end = index * self.block_size, (index + 1) * self.block_size
        tokens = tuple(seq.token_ids[start:end])
        images = tuple(img.content_hash for img in seq.images_in(start, end))
        return hash((parent, tokens, images)), tokens

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a newly admitted sequence the cached blocks of its longest computed prefix.

        At least one prompt token is always left to compute, so the step yields logits.
        Returns the number of tokens taken from the cache.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, seq.request_id
        if not self.enable_prefix_caching:
            return 0
        parent = None
        # every full block of the prompt could have been cached (the last token is always computed):
        # the hit rate is the share of those found, as vLLM counts it in tokens
        self.prefix_queried_blocks += (len(seq) - 1) // self.block_size
        for index in range((len(seq) - 1) // self.block_size):
            h, tokens = self.block_hash(seq, index, parent)
            block = self.hash_to_block.get(h)
            if block is None or self.block_key[block] != (h, tokens):
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
            self.prefix_hit_blocks += 1
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return seq.num_cached_tokens

    def ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; False (and no change) if blocks run out."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed > len(self.free):
            return False
        for _ in range(max(needed, 0)):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Enter the sequence's newly full and computed blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h, tokens = self.block_hash(seq, index, parent)
            block = seq.block_table[index]
            if h not in self.hash_to_block:  # an identical block computed elsewhere keeps its entry
                self.hash_to_block[h] = block
                self.block_key[block] = (h, tokens)
            seq.block_hashes.append(h)

    def free_sequence(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, (block, self.ref_counts[block])
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if block not in self.block_key:  # nothing to find again: reuse it first
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _forget(self, block: int) -> None:
        key = self.block_key.pop(block, None)
        if key is not None and self.hash_to_block.get(key[0]) == block:
            del self.hash_to_block[key[0]]
