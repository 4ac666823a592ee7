"""A request as the engine tracks it: token ids, progress, blocks, images. No tensors."""

from __future__ import annotations

import enum
import time
import itertools
from dataclasses import dataclass, field

from model.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's [IMG] tokens sit in the prompt, and its content hash (for prefix caching)."""

    content_hash: str
    start: int  # index of the image's first token ([IMG]) in the prompt
    end: int  # one past its last token ([IMG_END])


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    images: list[ImageSpan] = field(default_factory=list)
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the leading full, computed blocks
    finish_reason: str | None = None
    arrival: int = 0  # admission order, for FIFO fairness and preemption order
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    preemptions: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def images_in(self, start: int, end: int) -> list[ImageSpan]:
        """Images whose tokens overlap token positions [start, end)."""
        return [img for img in self.images if img.start < end and img.end > start]
