"""Incremental detokenization with stop strings.

Text is released only when it is final: never half a UTF-8 character (the decoder shows an
incomplete byte sequence as U+FFFD), and never the beginning of what may still become a stop string.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"
MAX_PENDING_TOKENS = 8


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | None = None) -> None:
        self.decode = decode
        self.stop = list(stop or [])
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0  # decode from here, so a word-initial space is rendered correctly
        self.read_offset = 0  # tokens before this are already in `text`
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one generated token; return the newly final text (maybe empty)."""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix_offset:self.read_offset])
        after = self.decode(self.ids[self.prefix_offset:])
        pending = len(self.ids) - self.read_offset
        # An incomplete character waits for its next bytes, but a UTF-8 character has at most 4:
        # past MAX_PENDING_TOKENS the bytes are invalid (released as U+FFFD) or invisible, and the
        # tail moves on, so the text decoded per step stays short (no quadratic re-decoding).
        if pending < MAX_PENDING_TOKENS and (after.endswith(REPLACEMENT) or len(after) <= len(before)):
            return self._release(final=False)  # incomplete character, or nothing visible yet
        search_from = max(len(self.text) - self.holdback, 0)
        self.text += after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [at for at in (self.text.find(s, search_from) for s in self.stop) if at != -1]
        if hits:
            self.text = self.text[:min(hits)]  # the earliest stop string wins
            self.stopped = True
            return self._release(final=True)
        return self._release(final=False)

    def flush(self) -> str:
        """The sequence ended for another reason: release everything held back."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else max(len(self.text) - self.holdback, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
