"""Continuous batching: which sequences run how many tokens in the next step.

Every step mixes decodes and (chunked) prefills under one token budget. Running sequences go
first, oldest first; then waiting ones are admitted strictly first-come first-served. When the
KV cache runs out, the newest running sequence is preempted (its blocks freed, its KV recomputed
later from its prompt plus what it has generated so far).
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from model.engine.block_manager import BlockManager
from model.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        assert self.max_num_seqs >= 1 and self.max_num_batched_tokens >= 1, self


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence: its last logits pick the next token."""
        return self.start + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # ordered by arrival
        self.num_preemptions = 0
        self._arrivals = 0

    def add(self, seq: Sequence) -> None:
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, n, scheduled):
                continue
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            scheduled.add(seq.seq_id)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.blocks.allocate_prefix(seq)
            n = min(seq.num_uncomputed, budget)
            if not self.blocks.ensure_blocks(seq, seq.num_computed_tokens + n):
                self.blocks.free_sequence(seq)  # hold no blocks while waiting; stay first in line
                seq.num_cached_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return chunks

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Blocks for `n` more tokens of a running sequence, preempting newer sequences if needed."""
        while not self.blocks.ensure_blocks(seq, seq.num_computed_tokens + n):
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        # Preemption goes newest first, so pushing each to the front keeps arrival order.
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.blocks.free_sequence(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
