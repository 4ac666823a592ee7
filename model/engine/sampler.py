"""Turn a batch of fp32 logits into next tokens, each row with its own sampling parameters.

Each sequence owns a torch.Generator (seeded from its `seed`, else from fresh entropy), so a seeded
request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from model.engine.guided import apply_allowed
from model.engine.sampling_params import SamplingParams


@dataclass
class TokenLogprobs:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SamplerState:
    """What sampling remembers about one sequence between steps."""

    params: SamplingParams
    generator: torch.Generator
    counts: Counter = field(default_factory=Counter)  # generated token -> times, for penalties
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias and banned tokens (-inf), as (ids, values)

    @staticmethod
    def create(params: SamplingParams, device: torch.device) -> "SamplerState":
        gen = torch.Generator(device=device)
        if params.seed is None:
            gen.seed()
        else:
            gen.manual_seed(params.seed)
        bias = None
        added = {**params.logit_bias, **{t: float("-inf") for t in params.banned_token_ids}}
        if added:
            bias = (torch.tensor(list(added), device=device),
                    torch.tensor(list(added.values()), device=device, dtype=torch.float32))
        return SamplerState(params, gen, bias=bias)


def sample(logits: torch.Tensor, states: list[SamplerState], allowed: list[torch.Tensor | None] | None = None
           ) -> tuple[list[int], list[TokenLogprobs | None], dict[int, str]]:
    """logits: (B, V) fp32 -> one token per row (and its logprobs when asked for).

    `allowed`: per row, the packed mask of tokens its grammar allows (None: unconstrained).
    logit_bias is added first and the grammar mask applied after it, so a bias cannot bring back
    a token the grammar forbids. Rows with neither are not touched. Logprobs are those of the
    distribution sampled from.

    A row that cannot be sampled (say its logits are not finite) fails alone: it is returned in
    the third value, row -> reason, with token -1, and the other rows are sampled as usual.
    """
    assert logits.shape[0] == len(states), (logits.shape, len(states))
    for i, state in enumerate(states):
        if state.bias is not None:
            ids, values = state.bias
            logits[i, ids] += values
    constrained = [i for i, mask in enumerate(allowed or []) if mask is not None]
    if constrained:
        apply_allowed(logits, constrained, [allowed[i] for i in constrained])
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(s.params.logprobs for s in states) else None
    # Plain greedy rows (the common case) take one batched argmax instead of one call per row.
    plain = [s.params.greedy and not (s.params.has_penalties and s.counts) for s in states]
    argmax = logits.argmax(dim=-1).tolist() if any(plain) else []
    tokens, failed = [], {}
    for i, (row, state) in enumerate(zip(logits, states)):
        try:
            tokens.append(argmax[i] if plain[i] else _sample_row(_apply_penalties(row, state), state))
        except (RuntimeError, ValueError) as exc:  # this row's numbers, not the engine's state
            failed[i] = f"sampling failed: {str(exc).splitlines()[0]}"
            tokens.append(-1)
            continue
        state.counts[tokens[-1]] += 1
    infos = [None if not s.params.logprobs or i in failed else _logprobs(raw_logprobs[i], tokens[i], s.params.top_logprobs)
             for i, s in enumerate(states)]
    return tokens, infos, failed


def _apply_penalties(row: torch.Tensor, state: SamplerState) -> torch.Tensor:
    p = state.params
    if not p.has_penalties or not state.counts:
        return row
    ids = torch.tensor(list(state.counts), device=row.device)
    counts = torch.tensor(list(state.counts.values()), device=row.device, dtype=row.dtype)
    row = row.clone()
    row[ids] -= p.frequency_penalty * counts + p.presence_penalty  # OpenAI's formula
    return row


def _sample_row(row: torch.Tensor, state: SamplerState) -> int:
    p = state.params
    if p.greedy:
        return int(row.argmax())
    row = (row - row.max()) / p.temperature  # <= 0: a small temperature cannot overflow to inf
    if 0 < p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = torch.softmax(row, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=state.generator))


def _logprobs(row: torch.Tensor, token: int, n_top: int) -> TokenLogprobs:
    top = []
    if n_top:
        values, ids = torch.topk(row, n_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(token, float(row[token]), top)
