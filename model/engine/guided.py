"""Grammar-constrained decoding with llguidance: which tokens a sequence may sample next.

llguidance (the Rust library behind Guidance, also used by vLLM and llama.cpp) matches a grammar
against token *bytes*, so it needs the vocabulary as bytes. We build it from mistral-common's
tokenizer for both Pixtral tokenizers:

- Tekken (Pixtral-12B, v3): ids below `num_special_tokens` are control tokens; every other id has
  its byte piece.
- SentencePiece (Pixtral-Large, v7): control and unknown pieces are special; the 256 byte-fallback
  pieces `<0xNN>` are the single byte NN; other pieces are their text with `▁` read as a space.

Special tokens are marked as such, so a JSON grammar never allows one; EOS is allowed exactly
when the grammar has reached an accepting state. (mistral-common ships an llguidance adapter,
but for Tekken only; Pixtral-Large's v7 tokenizer is SentencePiece.)

A grammar is compiled once per process and cached by its text; each request gets a copy of the
compiled matcher. Masks are packed bits, 32 tokens per int32 word, as llguidance writes them.

Finishing within the budget: a constrained output that runs out of max_tokens mid-JSON would not
parse. Near the end of its budget the engine asks `closing_plan` for a short way to an accepting
state and, once that plan fills what is left (with a margin), forces it token by token. The plan is
greedy: the tokens the grammar forces, else the first allowed of a few closers (close a string, an
object, an array; a 0 where a value must come), else the lowest allowed token.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

MAX_CACHED_GRAMMARS = 256
# closers tried in order outside a JSON string: they end a container or give its shortest value
CLOSERS_OUTSIDE_STRINGS = ("}", "]", "0", '"')
# JSON without free-form whitespace between tokens: a model cannot stall in an endless run of
# blanks, and the output is as compact as OpenAI's.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A grammar (a response_format schema) that cannot be compiled; the message says why."""


def json_grammar(schema: dict | None) -> str:
    """The llguidance grammar for JSON matching `schema` (None: any JSON object)."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"},
                                                                 defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from exc
    error = llguidance_error(grammar)
    if error:
        raise GrammarError(error)
    return grammar


def llguidance_error(grammar: str) -> str | None:
    """Why llguidance cannot compile `grammar` (checked without a vocabulary), or None."""
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar).strip() or None


class _VocabularyBytes:
    """mistral-common's tokenizer as llguidance's TokenizerWrapper expects it."""

    is_tokenizer_wrapper = True

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens, self.special_token_ids = _token_bytes(tokenizer)
        is_sentencepiece = not hasattr(tokenizer, "id_to_byte_piece")
        self._sentinel = tokenizer.encode("\n", bos=False, eos=False) if is_sentencepiece else None
        if len(self.tokens) > vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tokens)} tokens, more than the model's {vocab_size}")
        self.tokens += [b""] * (vocab_size - len(self.tokens))  # ids the tokenizer never makes: never allowed

    def __call__(self, text: str | bytes) -> list[int]:
        """Token ids of `text` exactly, as llguidance asks when it reasons about how text tokenizes
        (with the wrong answer its masks are wrong).

        SentencePiece puts a space (the dummy prefix) before any text it encodes; we encode after
        a newline, which is a byte-fallback token that merges with nothing, and drop the tokens
        the newline alone gives."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if self._sentinel is None:
            return self._tokenizer.encode(text, bos=False, eos=False)
        ids = self._tokenizer.encode("\n" + text, bos=False, eos=False)
        assert ids[:len(self._sentinel)] == self._sentinel, (text[:40], ids[:4])
        return ids[len(self._sentinel):]


def _special_name(piece: str) -> bytes:
    # llguidance names special tokens <...>; Mistral's are [...] (a fact of its grammar syntax)
    match = re.fullmatch(r"\[(.*)\]", piece)
    return (f"<{match.group(1)}>" if match else piece).encode()


def _token_bytes(tokenizer) -> tuple[list[bytes], list[int]]:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    tokens, special = [], []
    sentencepiece = getattr(tokenizer, "_model", None)
    if hasattr(tokenizer, "num_special_tokens") and hasattr(tokenizer, "id_to_byte_piece"):  # Tekken
        for i in range(tokenizer.n_words):
            if i < tokenizer.num_special_tokens:
                special.append(i)
                tokens.append(_special_name(tokenizer.id_to_piece(i)))
            else:
                tokens.append(tokenizer.id_to_byte_piece(i, SpecialTokenPolicy.RAISE))
        return tokens, special
    if sentencepiece is None or not hasattr(sentencepiece, "is_byte"):
        raise TypeError(f"no byte vocabulary for a {type(tokenizer).__name__}")
    for i in range(sentencepiece.get_piece_size()):
        piece = sentencepiece.id_to_piece(i)
        if sentencepiece.is_control(i) or sentencepiece.is_unknown(i):
            special.append(i)
            tokens.append(_special_name(piece))
        elif sentencepiece.is_byte(i):  # byte fallback: <0xNN>
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode())
    return tokens, special


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer and hands each request its own matcher."""

    def __init__(self, tokenizer_file: str | Path, vocab_size: int) -> None:
        self.tokenizer_file = Path(tokenizer_file)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._tokenizer = None
        self._vocab: _VocabularyBytes | None = None
        self._compiled: OrderedDict[str, object] = OrderedDict()

    @property
    def tokenizer(self):
        """llguidance's view of the vocabulary (built on first use: about a second for 131k tokens)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance
                from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

                inner = MistralTokenizer.from_file(str(self.tokenizer_file)).instruct_tokenizer.tokenizer
                self._vocab = _VocabularyBytes(inner, self.vocab_size)
                self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(self._vocab))
                self._closing_ids = self._byte_token_ids()
                # the ordinary (not special) tokens, bit i for token i
                self._ordinary = (1 << self.vocab_size) - 1 - sum(1 << t for t in self._vocab.special_token_ids)
            return self._tokenizer

    def _byte_token_ids(self) -> dict[str, int]:
        """The single-character tokens the closing plan uses (the first id when there are several)."""
        wanted = {c.encode(): c for c in (*CLOSERS_OUTSIDE_STRINGS, '"', "\\")}
        ids: dict[str, int] = {}
        for token_id, piece in enumerate(self._vocab.tokens):
            if piece in wanted and wanted[piece] not in ids:
                ids[wanted[piece]] = token_id
        return ids

    def compile(self, grammar: str):
        """The compiled matcher for `grammar`, from the cache or built now (llguidance releases the
        GIL while it compiles, so callers run this in a thread)."""
        with self._lock:
            if grammar in self._compiled:
                self._compiled.move_to_end(grammar)
                return self._compiled[grammar]
        import llguidance

        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, grammar: str):
        """A fresh matcher for one request: a copy of the compiled one."""
        return self.compile(grammar).deep_copy()

    def allowed(self, matcher) -> torch.Tensor:
        """The tokens `matcher` allows next, as packed bits: (ceil(vocab / 32),) int32."""
        import llguidance.torch

        # a plain host tensor: llguidance's own allocator pins memory when CUDA is present, a cost
        # on every step for every constrained row; the sampler moves the masks in one copy
        mask = torch.empty(1, (self.vocab_size + 31) // 32, dtype=torch.int32)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        return mask[0]

    def only(self, token: int) -> torch.Tensor:
        """A packed mask that allows `token` alone."""
        mask = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        mask[token // 32] = _bit(token % 32)
        return mask

    def all_but(self, token: int) -> torch.Tensor:
        """A packed mask that allows every token except `token`."""
        mask = torch.full(((self.vocab_size + 31) // 32,), -1, dtype=torch.int32)
        mask[token // 32] = ~_bit(token % 32)
        return mask

    def closing_plan(self, matcher, limit: int) -> list[int] | None:
        """The tokens of a short way from `matcher`'s state to the grammar's end (EOS last when the
        grammar does not stop by itself), or None if none is found within `limit` tokens.

        Greedy: the tokens the grammar forces, else a closing quote inside a string, else the first
        allowed of `CLOSERS_OUTSIDE_STRINGS`, else the lowest allowed ordinary token. Tried on the
        request's own matcher and rolled back (each token is validated before it is consumed, so
        the matcher never enters its error state)."""
        self.tokenizer  # noqa: B018 - builds the byte ids on first use
        ids, backslash = self._closing_ids, self._closing_ids.get("\\")
        plan: list[int] = []
        consumed = 0
        try:
            while not matcher.is_accepting():
                if len(plan) >= limit:
                    return None
                step = matcher.compute_ff_tokens()[:limit - len(plan)]
                if not step:
                    # inside a JSON string, and only there, a backslash may come next
                    in_string = backslash is not None and matcher.validate_tokens([backslash]) == 1
                    candidates = ['"'] if in_string else CLOSERS_OUTSIDE_STRINGS
                    step = next(([ids[c]] for c in candidates if c in ids and matcher.validate_tokens([ids[c]]) == 1),
                                None) or self._lowest_allowed(matcher, exclude=backslash)
                if not step or matcher.validate_tokens(step) != len(step) or not matcher.consume_tokens(step):
                    return None
                plan += step
                consumed += len(step)
            if not matcher.is_stopped():
                plan.append(self._vocab.eos_token_id)
            return plan if len(plan) <= limit else None
        finally:
            matcher.rollback(consumed)

    def _lowest_allowed(self, matcher, exclude: int | None) -> list[int]:
        """The lowest-numbered ordinary token the grammar allows (single bytes come first in both
        vocabularies), other than `exclude`. The mask as one Python integer: a few C-level
        operations on 16 KB, where tensor ops would cost more in overhead."""
        bits = int.from_bytes(matcher.compute_bitmask(), "little") & self._ordinary
        if exclude is not None:
            bits &= ~(1 << exclude)
        return [(bits & -bits).bit_length() - 1] if bits else []


def _bit(position: int) -> int:
    """The int32 word with only bit `position` set (bit 31 is the sign bit)."""
    return 1 << position if position < 31 else -(1 << 31)


def apply_allowed(logits: torch.Tensor, rows: list[int], masks: list[torch.Tensor]) -> None:
    """Set every token a row's mask does not allow to -inf, in place (only the constrained rows)."""
    bits = torch.arange(32, dtype=torch.int32, device=logits.device)
    words = torch.stack(masks).to(logits.device)  # (n, words)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :logits.shape[1]]
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
