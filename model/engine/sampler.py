"""Turn a batch of fp32 logits into next tokens, each row with its own sampling parameters.

One vectorised path for the whole batch: logit_bias, grammar masks and penalties are scattered in
from flat host lists (one copy each); temperature, top-k and top-p are applied to all sampled rows
at once, on the top max(k) candidates when every sampled row has a top_k (no full-vocabulary sort);
the draw is by inverse CDF, one uniform number per row. The tokens, the failed rows and the
logprobs come back to the host together at the end. Not yet on CUDA: row selections by Python
list (`logits[rows]`) and the small parameter tensors are copied from pageable host memory, and
each such copy waits for the stream, so the host cannot queue the sampler's kernels while the
forward runs (one pinned copy of all of them would remove it; not measured on GPU yet).

Each seeded sequence owns a torch.Generator that draws its row's number, so a seeded request
draws the same tokens whatever else shares its batch. Unseeded rows share one draw.
"""

from __future__ import annotations

import math
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
    generator: torch.Generator | None  # seeded requests only
    counts: Counter = field(default_factory=Counter)  # generated token -> times, for penalties
    bias: dict[int, float] = field(default_factory=dict)  # logit_bias, and banned tokens at -inf

    @staticmethod
    def create(params: SamplingParams, device: torch.device) -> "SamplerState":
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(params.seed)
        bias = {**params.logit_bias, **{t: float("-inf") for t in params.banned_token_ids}}
        return SamplerState(params, gen, bias=bias)


def sample(logits: torch.Tensor, states: list[SamplerState], allowed: list[torch.Tensor | None] | None = None
           ) -> tuple[list[int], list[TokenLogprobs | None], dict[int, str]]:
    """logits: (B, V) fp32 -> one token per row (and its logprobs when asked for). The bias and the
    grammar masks are applied to `logits` in place.

    `allowed`: per row, the packed mask of tokens its grammar allows (None: unconstrained).
    logit_bias is added first and the grammar mask applied after it, so a bias cannot bring back
    a token the grammar forbids. Logprobs are taken there, before penalties and temperature (the
    model's distribution, as vLLM reports it). Penalties apply to greedy rows too.

    A row that cannot be sampled (its logits are NaN or +inf, or every token is banned) fails
    alone: it is returned in the third value, row -> reason, with token -1, and the other rows
    are sampled as usual.
    """
    assert logits.shape[0] == len(states), (logits.shape, len(states))
    _scatter_add(logits, [(i, s.bias) for i, s in enumerate(states) if s.bias], inplace=True)
    constrained = [i for i, mask in enumerate(allowed or []) if mask is not None]
    if constrained:
        apply_allowed(logits, constrained, [allowed[i] for i in constrained])
    want_logprobs = [i for i, s in enumerate(states) if s.params.logprobs]
    raw_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
    logits = _scatter_add(logits, [(i, _penalties(s)) for i, s in enumerate(states) if s.params.has_penalties and s.counts])

    # one pass gives the greedy tokens and the failed rows: a row's max is NaN if any logit is,
    # +inf if any is, -inf if all are
    top, tokens = logits.max(dim=-1)
    bad = ~torch.isfinite(top)
    drawn = [i for i, s in enumerate(states) if not s.params.greedy]
    if drawn:
        rows = logits[drawn].masked_fill(bad[drawn, None], 0.0)  # a failed row flows through, unused
        tokens[drawn] = _draw(rows, [states[i] for i in drawn])

    n_top = max((states[i].params.top_logprobs for i in want_logprobs), default=0)
    chosen_lp = top_lp = top_ids = None
    if want_logprobs:
        chosen_lp = raw_logprobs.gather(1, tokens[want_logprobs, None])[:, 0]
        if n_top:
            top_lp, top_ids = raw_logprobs.topk(n_top, dim=-1)
    # the only waits on the device, all at the end
    host_tokens, host_bad = tokens.tolist(), bad.tolist()
    host_lp = chosen_lp.tolist() if chosen_lp is not None else []
    host_top = (top_ids.tolist(), top_lp.tolist()) if top_lp is not None else None

    failed = {i: "sampling failed: the logits are not finite, or no token is allowed"
              for i, is_bad in enumerate(host_bad) if is_bad}
    infos: list[TokenLogprobs | None] = [None] * len(states)
    for j, i in enumerate(want_logprobs):
        if i in failed:
            continue
        k = states[i].params.top_logprobs
        top = list(zip(host_top[0][j][:k], host_top[1][j][:k])) if k else []
        infos[i] = TokenLogprobs(host_tokens[i], host_lp[j], top)
    for i, state in enumerate(states):
        if i in failed:
            host_tokens[i] = -1
        else:
            state.counts[host_tokens[i]] += 1
    return host_tokens, infos, failed


def _penalties(state: SamplerState) -> dict[int, float]:
    p = state.params
    return {t: -(p.frequency_penalty * n + p.presence_penalty) for t, n in state.counts.items()}  # OpenAI's formula


def _scatter_add(logits: torch.Tensor, rows: list[tuple[int, dict[int, float]]], inplace: bool = False) -> torch.Tensor:
    """Add {token: value} to the given rows, all rows in one indexed add (one copy of each list)."""
    if not rows:
        return logits
    index = torch.tensor([(i, t) for i, d in rows for t in d], dtype=torch.long).to(logits.device)
    values = torch.tensor([v for _, d in rows for v in d.values()], dtype=logits.dtype).to(logits.device)
    add = logits.index_put_ if inplace else logits.index_put
    return add((index[:, 0], index[:, 1]), values, accumulate=True)


# On CPU, sorting a 131k-token vocabulary costs a quarter to nearly all of a decode step of the
# dim-1024 benchmark checkpoint (12 ms for one row, 46 for 8, 194 for 32, on this project's 2-core
# machine), and a top_p row's nucleus usually lies within its top NUCLEUS_CANDIDATES tokens, which
# topk finds 15x faster. Whether it does is read on the host, per row; a GPU sorts (fast there)
# and never waits.
NUCLEUS_CANDIDATES = 1024


def _draw(logits: torch.Tensor, states: list[SamplerState]) -> torch.Tensor:
    """Sampled rows (n, V), finite -> (n,) tokens: temperature, top-k, top-p, then one draw per row."""
    device, vocab = logits.device, logits.shape[1]
    temperature = torch.tensor([s.params.temperature for s in states], dtype=logits.dtype).to(device)
    # (x - max) <= 0: a small temperature cannot overflow to +inf
    x = (logits - logits.max(dim=-1, keepdim=True).values) / temperature[:, None]
    ks = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in states]
    top_p = [s.params.top_p for s in states]
    u = torch.empty(len(states), 1, device=device, dtype=x.dtype)  # one number per row, whichever path it takes
    unseeded = [j for j, s in enumerate(states) if s.generator is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), 1, device=device, dtype=x.dtype)
    for j, s in enumerate(states):
        if s.generator is not None:
            u[j].uniform_(generator=s.generator)  # its own stream, whatever shares the batch
    if device.type != "cpu" or max(ks) < vocab or min(top_p) == 1.0 or vocab <= NUCLEUS_CANDIDATES:
        return _draw_sorted(x, ks, top_p, u)
    drawn, drawn_tokens = _draw_from_top_candidates(x, ks, top_p, u)
    if not drawn:
        return _draw_sorted(x, ks, top_p, u)
    tokens = torch.empty(len(states), dtype=torch.long, device=device)
    tokens[drawn] = drawn_tokens
    rest = sorted(set(range(len(states))) - set(drawn))
    if rest:  # what the top candidates cannot serve: the whole vocabulary, sorted
        tokens[rest] = _draw_sorted(x[rest], [ks[j] for j in rest], [top_p[j] for j in rest], u[rest])
    return tokens


def _draw_sorted(x: torch.Tensor, ks: list[int], top_p: list[float], u: torch.Tensor) -> torch.Tensor:
    """Rows on the candidates top-k and top-p need, in descending order: the top max(k) when every
    row has a top_k, else the whole vocabulary sorted; no candidates when neither filter is set."""
    device, vocab = x.device, x.shape[1]
    candidates = None  # token id of each column of x, when x holds sorted candidates
    if max(ks) < vocab or min(top_p) < 1.0:
        x, candidates = x.topk(max(ks), dim=-1) if max(ks) < vocab else x.sort(dim=-1, descending=True)
        if min(ks) < x.shape[1]:
            rank = torch.arange(x.shape[1], device=device)
            x = x.masked_fill(rank[None, :] >= torch.tensor(ks).to(device)[:, None], float("-inf"))
    return _inverse_cdf(torch.softmax(x, dim=-1), candidates, top_p, u)


def _draw_from_top_candidates(x: torch.Tensor, ks: list[int], top_p: list[float], u: torch.Tensor
                              ) -> tuple[list[int], torch.Tensor | None]:
    """The rows whose top_k is at most NUCLEUS_CANDIDATES, or whose top_p nucleus lies within their
    top NUCLEUS_CANDIDATES tokens (the rest of the vocabulary would be cut anyway), and their
    tokens: the same draw as from the whole sorted vocabulary."""
    width = NUCLEUS_CANDIDATES
    log_total = x.logsumexp(dim=-1)  # each row's normaliser over the whole vocabulary
    # A row's top `width` tokens hold at most width x its largest probability, exp(0 - log_total)
    # (x's maximum is 0). A row flatter than that cannot have its nucleus there: it skips the topk.
    bound = (math.log(width) - log_total).exp().tolist()
    rows = [j for j in range(x.shape[0]) if ks[j] <= width or (top_p[j] < 1.0 and bound[j] >= top_p[j])]
    if not rows:
        return [], None
    top, candidates = x[rows].topk(width, dim=-1)
    k = torch.tensor([ks[j] for j in rows])
    top = top.masked_fill(torch.arange(width)[None, :] >= k[:, None], float("-inf"))
    # a top_k row renormalises over its k tokens (as _draw_sorted's softmax does); any other row is
    # normalised over the whole vocabulary, so its cumulative sum is what the full sort would give
    log_total = torch.where(k <= width, top.logsumexp(dim=-1), log_total[rows])
    probs = (top - log_total[:, None]).exp()
    mass = probs.cumsum(dim=-1)[:, -1].tolist()  # the host check (a CPU tensor: no device to wait on)
    ok = [i for i, j in enumerate(rows) if ks[j] <= width or mass[i] >= top_p[j]]
    if not ok:
        return [], None
    drawn = [rows[i] for i in ok]
    if len(ok) < len(rows):
        probs, candidates = probs[ok], candidates[ok]
    return drawn, _inverse_cdf(probs, candidates, [top_p[j] for j in drawn], u[drawn])


def _inverse_cdf(probs: torch.Tensor, candidates: torch.Tensor | None, top_p: list[float], u: torch.Tensor
                 ) -> torch.Tensor:
    """Top-p over probabilities in descending order, then each row's token by its uniform number."""
    if min(top_p) < 1.0:
        # drop a candidate when the ones ranked above it already reach top_p (the first always stays)
        limit = torch.tensor(top_p, dtype=probs.dtype).to(probs.device)[:, None]
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= limit, 0.0)
    cdf = probs.cumsum(dim=-1)
    # the first column whose cumulative probability passes u x total: a zero-probability column
    # never does, as the cdf does not rise there
    column = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.shape[1] - 1)
    return (column if candidates is None else candidates.gather(1, column))[:, 0]
