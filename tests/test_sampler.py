"""The batched sampler: every row's own parameters in one vectorised pass."""

from __future__ import annotations

import math

import pytest
import torch

from model.engine import sampler
from model.engine.sampler import SamplerState, sample
from model.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")


def states_for(*params: SamplingParams) -> list[SamplerState]:
    return [SamplerState.create(p, CPU) for p in params]


BASE = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])  # softmax: 0.57, 0.21, 0.13, 0.08, 0.03
PLAIN = (SamplingParams(temperature=1.0), torch.softmax(BASE, 0))
TOP_K = (SamplingParams(temperature=0.5, top_k=2), torch.softmax(BASE[:2] / 0.5, 0))
# top_p 0.7 keeps the first two: 0.57 < 0.7, then 0.78 >= 0.7
TOP_P = (SamplingParams(temperature=1.0, top_p=0.7), torch.softmax(BASE[:2], 0))
TOP_K_P = (SamplingParams(temperature=1.0, top_k=3, top_p=0.7), torch.softmax(BASE[:2], 0))


@pytest.mark.parametrize("groups", [
    [PLAIN],  # no candidates: the whole vocabulary, unsorted
    [PLAIN, TOP_K, TOP_P],  # a row without top_k: the whole vocabulary, sorted
    [TOP_K, TOP_K_P],  # every row has a top_k: the top max(k) candidates only
], ids=["plain", "sorted", "top-k-candidates"])
def test_draws_follow_each_rows_distribution(groups):
    """4,000 unseeded rows per group in one call, each group with its own temperature, top_k and
    top_p: each group's token frequencies match its own truncated, renormalised distribution."""
    n = 4000
    params = [p for p, _ in groups for _ in range(n)]
    tokens, _, failed = sample(BASE.repeat(len(params), 1), states_for(*params))
    assert not failed
    for g, (group_params, expected) in enumerate(groups):
        freq = torch.bincount(torch.tensor(tokens[g * n:(g + 1) * n]), minlength=5).float() / n
        assert freq[len(expected):].sum() == 0, (group_params, freq)  # truncated tokens never drawn
        tolerance = 4 * (expected * (1 - expected) / n).sqrt()  # 4 standard errors of a proportion
        assert ((freq[:len(expected)] - expected).abs() <= tolerance).all(), (group_params, freq, expected)


def test_seeded_row_draws_the_same_whatever_shares_its_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=42)
    mates = [SamplingParams(temperature=1.3), SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=7),
             SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0.5, frequency_penalty=1.0)]
    alone_state, batch_states = states_for(seeded)[0], states_for(seeded, *mates)
    alone, together = [], []
    for step in range(20):
        row = logits[step % 6:step % 6 + 1]
        alone.append(sample(row.clone(), [alone_state])[0][0])
        batch = torch.cat([row, torch.randn(5, 1000)])
        together.append(sample(batch, batch_states)[0][0])
    assert alone == together
    assert len(set(alone)) > 1  # it did sample


def test_penalties_bias_and_logprobs_per_row_in_one_batch():
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]] * 3)
    penalised, biased, reported = states_for(
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, logit_bias={3: 5.0}),
        SamplingParams(temperature=0.0, top_logprobs=2, presence_penalty=2.0))
    penalised.counts[1] = reported.counts[1] = 1
    tokens, infos, failed = sample(logits, [penalised, biased, reported])
    assert tokens == [2, 3, 2] and not failed
    assert infos[0] is None and infos[1] is None
    # logprobs of the model's distribution (before penalties), the token the penalties chose
    raw = torch.log_softmax(torch.tensor([0.0, 3.0, 2.5, 1.0]), 0)
    assert infos[2].token == 2 and abs(infos[2].logprob - raw[2].item()) < 1e-6
    assert [t for t, _ in infos[2].top] == [1, 2]


def test_a_row_with_every_token_banned_fails_alone():
    logits = torch.zeros(2, 4)
    states = states_for(SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=1.0, seed=1, logprobs=True))
    states[1].bias = {t: float("-inf") for t in range(4)}
    tokens, infos, failed = sample(logits, states)
    assert list(failed) == [1] and tokens[1] == -1 and infos[1] is None and 0 <= tokens[0] < 4


def test_top_p_from_the_top_candidates_draws_as_the_full_sort(monkeypatch):
    """On CPU a top_p row whose nucleus lies within its top NUCLEUS_CANDIDATES tokens is drawn from
    those (topk, no sort of the vocabulary). Seeded rows draw the same tokens as when every row
    goes through the full sort; the rows the candidates cannot serve (a flat distribution, no
    filter at all) still take it."""
    vocab = 8192
    torch.manual_seed(5)
    peaked, flat = torch.randn(vocab) * 5, torch.randn(vocab) * 0.1  # top 1,024: ~all of the mass; ~1/8
    # one token holds half the mass, the rest is flat: the top 1,024 might hold 0.9 (1,024 x 0.5),
    # but hold 0.56, so this row is looked at and then sorted
    half = torch.zeros(vocab)
    half[7] = math.log(vocab - 1)
    params = [SamplingParams(temperature=1.0, top_p=0.95, seed=1),  # peaked: from the candidates
              SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=2),  # peaked, top_k: from them too
              SamplingParams(temperature=1.0, top_p=0.9, seed=3),  # flat: the full sort
              SamplingParams(temperature=1.0, seed=4),  # no filter: the whole vocabulary
              SamplingParams(temperature=1.0, top_p=0.9, seed=5)]  # half: the full sort
    rows = [peaked, peaked, flat, flat, half]
    sorted_rows = []
    real = sampler._draw_sorted

    def recording(x, ks, top_p, u):
        sorted_rows.append(x.shape[0])
        return real(x, ks, top_p, u)

    monkeypatch.setattr(sampler, "_draw_sorted", recording)

    def draws() -> list[list[int]]:
        states = states_for(*params)
        return [sample(torch.stack(rows), states)[0] for _ in range(30)]

    from_candidates = draws()
    assert sorted_rows == [3] * 30  # the flat row, the unfiltered one and the half one, every step
    monkeypatch.setattr(sampler, "NUCLEUS_CANDIDATES", vocab)  # the vocabulary is no larger: always sort
    sorted_rows.clear()
    assert draws() == from_candidates
    assert sorted_rows == [5] * 30
    assert len({t[0] for t in from_candidates}) > 1 and len({t[4] for t in from_candidates}) > 1  # it did sample
