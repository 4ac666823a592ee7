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


def test_tp2_greedy_tokens_match_tp1(tp2, mistral_12b):
    engine, _ = tp2
    model = load_model(mistral_12b)
    reqs = []
    for i, parts in enumerate([["Hello there"], ["Look", random_image(50, 40, 1)], ["Two", random_image(20, 20, 2),
                                                                                      random_image(64, 32, 3)]]):
        tokens, pixels = encode_chat(mistral_12b, parts)
        reqs.append((f"q{i}", tokens, image_features(model, pixels)))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    single = build_local_engine(mistral_12b, model=model, num_blocks=256)
    for engine_ in (single, engine):
        for rid, tokens, feats in reqs:
            engine_.add_request(rid, tokens, params, feats)
    ref = {k: [t for o in v for t in o.token_ids] for k, v in single.run_to_completion().items()}
    got = {k: [t for o in v for t in o.token_ids] for k, v in engine.run_to_completion().items()}
    assert got == ref
    assert engine.stats().free_blocks == engine.stats().num_blocks


def test_rank_selects_its_gpu_among_all_it_sees():
    """On CUDA a rank sees every GPU of its node (NCCL's P2P paths need them) and selects the one
    Ray gave it, by its place in CUDA_VISIBLE_DEVICES when the node narrows that."""
    from serving.tp_executor import RankResources, rank_runtime_env, visible_index

    assert visible_index(3, None) == 3
    assert visible_index("6", "4,5,6,7") == 2
    assert rank_runtime_env(RankResources(device="cuda")) == {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    assert rank_runtime_env(RankResources(device="cpu")) == {}
