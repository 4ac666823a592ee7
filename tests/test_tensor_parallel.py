"""TP=2 on CPU (two gloo ranks in a Ray placement group) equals TP=1."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from tests.helpers import encode_chat, image_features, random_image


@pytest.fixture(scope="module")
def tp2(ray_cluster, mistral_12b):
    from model.engine.local_executor import KVBudget
    from serving.tp_executor import RankResources, build_tp_engine

    engine, executor = build_tp_engine(str(mistral_12b), 2, RankResources("cpu", cpus_per_rank=0.5),
                                       kv=KVBudget(cpu_bytes=64 << 20))
    yield engine, executor
    executor.shutdown()


def test_tp2_logits_match_tp1(tp2, mistral_12b):
    _, executor = tp2
    tokens, _ = encode_chat(mistral_12b, ["Tensor parallel parity, please."])
    ref = load_model(mistral_12b).logits_no_cache(torch.tensor(tokens))
    got = executor.full_logits(tokens)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, diff


def test_tp2_greedy_tokens_match_tp1(tp2, mistral_12b, monkeypatch):
    """Greedy tokens at TP=2 equal TP=1's, with images and with a JSON grammar (whose masks only
    rank 0 is sent)."""
    from model.engine.guided import json_grammar
    from serving import tp_executor

    engine, _ = tp2
    model = load_model(mistral_12b)
    reqs = []
    for i, parts in enumerate([["Hello there"], ["Look", random_image(50, 40, 1)], ["Two", random_image(20, 20, 2),
                                                                                      random_image(64, 32, 3)]]):
        tokens, pixels = encode_chat(mistral_12b, parts)
        reqs.append((f"q{i}", tokens, image_features(model, pixels)))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=40, temperature=0.0, grammar=json_grammar(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    masked_steps = []  # per step with masks: the shared step carries none of them
    split = tp_executor.split_masks

    def spy(step):
        shared, masks = split(step)
        if masks is not None:
            masked_steps.append(all(c.allowed is None for c in shared.chunks))
        return shared, masks

    monkeypatch.setattr(tp_executor, "split_masks", spy)
    single = build_local_engine(mistral_12b, model=model, num_blocks=256)
    for engine_ in (single, engine):
        for rid, tokens, feats in reqs:
            engine_.add_request(rid, tokens, params, feats)
        engine_.add_request("json", reqs[0][1], guided)
    ref = {k: [t for o in v for t in o.token_ids] for k, v in single.run_to_completion().items()}
    got = {k: [t for o in v for t in o.token_ids] for k, v in engine.run_to_completion().items()}
    assert got == ref
    assert masked_steps and all(masked_steps)
    assert engine.stats().free_blocks == engine.stats().num_blocks


def test_rank_selects_its_gpu_among_all_it_sees():
    """On CUDA a rank sees every GPU of its node (NCCL's P2P paths need them) and selects the one
    Ray gave it, by its place in CUDA_VISIBLE_DEVICES when the node narrows that."""
    from serving.tp_executor import RankResources, rank_runtime_env, visible_index

    assert visible_index(3, None) == 3
    assert visible_index("6", "4,5,6,7") == 2
    assert rank_runtime_env(RankResources(device="cuda")) == {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    assert rank_runtime_env(RankResources(device="cpu")) == {}


def test_block_tables_travel_as_deltas():
    """The ranks rebuild every table from deltas: growth, a preempted sequence's new pages, a
    finished sequence's id reused; a decode step that gains no page sends none."""
    from model.engine.model_runner import SeqChunk, StepInput
    from serving.tp_executor import TableReceiver, TableSender

    sender, receiver = TableSender(), TableReceiver()

    def step(tables: dict[int, list[int]], finished=()) -> StepInput:
        chunks = [SeqChunk(seq_id=s, token_ids=[1], start=0, block_table=t, sample=True) for s, t in tables.items()]
        return StepInput(chunks, finished=list(finished))

    steps = [
        step({1: [5, 6, 7], 2: [9]}),
        step({1: [5, 6, 7], 2: [9, 3]}),  # 1 gains nothing, 2 a page
        step({1: [11, 12], 2: [9, 3, 4]}),  # 1 was preempted: all new pages
        step({2: [9, 3]}, finished=[1]),  # a table that shrank (prefix kept)
        step({1: [8]}),  # id 1 again, after it finished
    ]
    sent = []
    for s in steps:
        encoded = sender.encode(s)
        sent.append([c.block_table for c in encoded.chunks])
        decoded = receiver.decode(encoded)
        assert [c.block_table for c in decoded.chunks] == [c.block_table for c in s.chunks]
    assert [(d.keep, d.append) for d in sent[1]] == [(3, []), (1, [3])]
    assert [(d.keep, d.append) for d in sent[2]] == [(0, [11, 12]), (2, [4])]
    assert [(d.keep, d.append) for d in sent[4]] == [(0, [8])]
