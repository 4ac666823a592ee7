"""Engine invariants: continuous batching == one at a time, preemption, prefix cache, abort, sampling."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from model.engine.cuda_graphs import DecodeGraphs
from model.engine.local_executor import build_local_engine
from model.engine.model_runner import ModelRunner
from model.engine.sampling_params import SamplingParams
from model.layers.attention import BACKEND_ENV
from tests.helpers import encode_chat, greedy_reference, image_features, random_image

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(mistral_12b):
    return load_model(mistral_12b)


@pytest.fixture(scope="module")
def requests_8(mistral_12b, model):
    """8 prompts of different lengths, some with images (one with two)."""
    specs = [
        ["Hi"],
        ["Describe this", random_image(40, 30, 1)],
        ["A much longer question about the history of lighthouses on rocky coasts " * 3],
        [random_image(90, 50, 2), "and", random_image(20, 64, 3), "compare them"],
        ["Short one"],
        ["What colour?", random_image(128, 16, 4)],
        ["Count to ten please, slowly and clearly, one by one"],
        ["Last", random_image(33, 33, 5), "thanks"],
    ]
    out = []
    for i, parts in enumerate(specs):
        tokens, pixels = encode_chat(mistral_12b, parts)
        out.append((f"r{i}", tokens, pixels, image_features(model, pixels)))
    return out


def run(engine, reqs, params=GREEDY) -> dict[str, list[int]]:
    for rid, tokens, _, feats in reqs:
        engine.add_request(rid, tokens, params, feats, [f"{rid}-{k}" for k in range(len(feats))])
    results = engine.run_to_completion()
    return {rid: [t for o in outs for t in o.token_ids] for rid, outs in results.items()}


def test_engine_matches_cache_free_reference(mistral_12b, model, requests_8):
    engine = build_local_engine(mistral_12b, model=model, num_blocks=256)
    for rid, tokens, pixels, feats in requests_8[:4]:
        got = run(engine, [(rid, tokens, pixels, feats)])[rid]
        assert got == greedy_reference(model, tokens, pixels, GREEDY.max_tokens), rid


@pytest.mark.parametrize("num_blocks, budget", [(256, 2048), (14, 48)])
def test_continuous_batching_equals_one_at_a_time(mistral_12b, model, requests_8, num_blocks, budget):
    alone_engine = build_local_engine(mistral_12b, model=model, num_blocks=256, enable_prefix_caching=False)
    alone = {rid: run(alone_engine, [(rid, t, p, f)])[rid] for rid, t, p, f in requests_8}
    engine = build_local_engine(mistral_12b, model=model, num_blocks=num_blocks, max_num_batched_tokens=budget,
                                enable_prefix_caching=False)
    together = run(engine, requests_8)
    assert together == alone
    if num_blocks == 14:
        assert engine.stats().preemptions > 0, "the small KV budget was meant to force preemption"
    assert engine.stats().free_blocks == num_blocks


def test_repeated_image_prompt_hits_prefix_cache(mistral_12b, model, requests_8):
    engine = build_local_engine(mistral_12b, model=model, num_blocks=256)
    rid, tokens, pixels, feats = requests_8[3]
    first = run(engine, [("a", tokens, pixels, feats)])["a"]
    hits_before = engine.stats().prefix_hit_blocks
    results = {}
    for rid2 in ("b",):
        engine.add_request(rid2, tokens, GREEDY, feats, ["a-0", "a-1"])  # same image hashes as before
        results = engine.run_to_completion()
    out = results["b"]
    assert engine.stats().prefix_hit_blocks > hits_before
    assert out[-1].cached_tokens >= engine.config.block_size
    assert [t for o in out for t in o.token_ids] == first


def test_different_image_same_tokens_misses_prefix_cache(mistral_12b, model):
    engine = build_local_engine(mistral_12b, model=model, num_blocks=256)
    tokens, pixels = encode_chat(mistral_12b, [random_image(64, 64, 10), "what is this?"])
    _, pixels2 = encode_chat(mistral_12b, [random_image(64, 64, 11), "what is this?"])
    run(engine, [("x", tokens, pixels, image_features(model, pixels))])
    engine.add_request("y", tokens, GREEDY, image_features(model, pixels2), ["other-image"])
    out = engine.run_to_completion()["y"]
    assert out[-1].cached_tokens < 16  # the image starts within the first block after BOS/[INST]
    assert [t for o in out for t in o.token_ids] == greedy_reference(model, tokens, pixels2, GREEDY.max_tokens)


def test_abort_frees_every_block(mistral_12b, model, requests_8):
    engine = build_local_engine(mistral_12b, model=model, num_blocks=64)
    for rid, tokens, _, feats in requests_8:
        engine.add_request(rid, tokens, SamplingParams(max_tokens=50, temperature=0.0), feats)
    engine.step()
    engine.step()
    assert engine.stats().free_blocks < 64
    for rid, *_ in requests_8:
        assert engine.abort(rid)
    outs = engine.step()
    assert {o.request_id for o in outs if o.finish_reason == "abort"} == {rid for rid, *_ in requests_8}
    assert engine.stats().free_blocks == 64 and engine.stats().kv_usage == 0.0
    assert not engine.has_unfinished


def test_seed_reproduces_sampled_output(mistral_12b, model, requests_8):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    engine = build_local_engine(mistral_12b, model=model, num_blocks=256)
    rid, tokens, pixels, feats = requests_8[1]
    a = run(engine, [("a", tokens, pixels, feats)], params)["a"]
    b = run(engine, [("b", tokens, pixels, feats), *requests_8[4:6]], params)["b"]  # other company
    c = run(engine, [("c", tokens, pixels, feats)], SamplingParams(max_tokens=16, temperature=1.0, seed=99))["c"]
    assert a == b
    assert a != c


def test_stop_strings_cut_text(mistral_12b, model):
    engine = build_local_engine(mistral_12b, model=model, num_blocks=256)
    tokens, _ = encode_chat(mistral_12b, ["Say something"])
    engine.add_request("free", tokens, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    free = engine.run_to_completion()["free"]
    text = "".join(o.text for o in free)
    assert len(text) > 6, text
    stop = text[3:6]
    engine.add_request("cut", tokens, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop, "\x00never"]))
    cut = engine.run_to_completion()["cut"]
    assert "".join(o.text for o in cut) == text[:text.index(stop)]
    assert cut[-1].finish_reason == "stop"
    stop_id = [t for o in free for t in o.token_ids][4]
    engine.add_request("tok", tokens, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id]))
    tok = engine.run_to_completion()["tok"]
    assert [t for o in tok for t in o.token_ids] == [t for o in free for t in o.token_ids][:5]
    assert tok[-1].finish_reason == "stop" and free[-1].finish_reason == "length"


def test_logprobs_match_rescoring(mistral_12b, model):
    """Generate, then rescore the prompt + output with a full forward: the same log-probabilities."""
    engine = build_local_engine(mistral_12b, model=model, num_blocks=256)
    tokens, pixels = encode_chat(mistral_12b, ["Rescore me", random_image(32, 48, 6)])
    feats = image_features(model, pixels)
    engine.add_request("lp", tokens, SamplingParams(max_tokens=8, temperature=0.7, seed=5, top_logprobs=3), feats)
    outs = engine.run_to_completion()["lp"]
    generated = [t for o in outs for t in o.token_ids]
    logprobs = [lp for o in outs for lp in o.logprobs]
    full = torch.log_softmax(model.logits_no_cache(torch.tensor(tokens + generated), pixels), dim=-1)
    for i, lp in enumerate(logprobs):
        row = full[len(tokens) - 1 + i]
        assert abs(lp.logprob - float(row[generated[i]])) < 1e-4
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_sampler_penalties_and_truncation():
    from model.engine.sampler import SamplerState, sample

    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]])

    def pick(**kw) -> int:
        state = SamplerState.create(SamplingParams(**kw), torch.device("cpu"))
        state.counts[1] = 1  # token 1 was generated once already
        return sample(logits, [state])[0][0]

    assert pick(temperature=0.0) == 1
    assert pick(temperature=0.0, frequency_penalty=1.0) == 2  # 3.0 - 1.0 < 2.5
    assert pick(temperature=0.0, presence_penalty=0.6) == 2
    assert pick(temperature=0.0, presence_penalty=0.4) == 1
    assert all(pick(temperature=1.5, top_k=1, seed=s) == 1 for s in range(20))
    assert all(pick(temperature=1.5, top_p=0.05, seed=s) == 1 for s in range(20))
    assert {pick(temperature=1.5, seed=s) for s in range(60)} == {0, 1, 2, 3}


def test_too_long_prompt_is_refused(mistral_12b, model):
    from model.engine.llm_engine import RequestError

    engine = build_local_engine(mistral_12b, model=model, num_blocks=4)  # 64 tokens of KV
    with pytest.raises(RequestError, match="maximum context length is 64"):
        engine.add_request("long", list(range(100, 200)), GREEDY)
    assert not engine.has_unfinished


def test_padded_decode_batches_equal_eager(mistral_12b, model, requests_8, monkeypatch):
    """Decode steps padded to fixed batch sizes (the shapes CUDA graphs replay) give the same tokens
    and logprobs as unpadded steps; the padding rows write only to their scratch page."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, top_logprobs=2)

    def tokens_and_logprobs(engine):
        for rid, tokens, _, feats in requests_8[:5]:
            engine.add_request(rid, tokens, params, feats, [f"{rid}-{k}" for k in range(len(feats))])
        return {rid: [(t, lp.logprob) for o in outs for t, lp in zip(o.token_ids, o.logprobs)]
                for rid, outs in engine.run_to_completion().items()}

    eager = tokens_and_logprobs(build_local_engine(mistral_12b, model=model, num_blocks=256))
    padded_engine = build_local_engine(mistral_12b, model=model, num_blocks=256, decode_batch_sizes=[1, 2, 4, 8])
    runner = padded_engine.executor.runner
    batch_rows = []
    forward = type(runner.model).forward
    monkeypatch.setattr(type(runner.model), "forward",
                        lambda self, x, *a, **kw: batch_rows.append(x.shape[0]) or forward(self, x, *a, **kw))
    padded = tokens_and_logprobs(padded_engine)
    assert 8 in batch_rows  # 5 decoding sequences padded to 8
    for rid in eager:
        assert [t for t, _ in padded[rid]] == [t for t, _ in eager[rid]], rid
        assert max(abs(a - b) for (_, a), (_, b) in zip(padded[rid], eager[rid])) <= 1e-5, rid
    runner_blocks = runner.kv_caches[0].k.shape[0]
    assert runner_blocks == 257 and runner.scratch_block == 256


def test_static_decode_forward_runs_outside_inference_mode(model, monkeypatch):
    """CUDA graph capture runs the static decode forward before any step, outside inference mode.
    Loaded weights require no grad, so that forward records no autograd history: FlexAttention
    refuses inputs that require grad (on CUDA because our block masks carry no query indices, on
    CPU outright), which made every capture fail."""
    from model.layers import flex_paged

    monkeypatch.setattr(flex_paged, "COMPILE", False)
    monkeypatch.setenv(BACKEND_ENV, "flex")
    assert not any(p.requires_grad for p in model.parameters())
    entry = ModelRunner(model, 64, 16, [2]).graphs.by_size[2]
    entry.load([entry.padding_row] * 2)
    assert not torch.is_inference_mode_enabled()
    logits = entry.forward()
    assert logits.shape == (2, model.args.vocab_size) and not logits.requires_grad


def test_a_failed_capture_decodes_eagerly_alone_and_stops_a_tensor_parallel_rank(model, monkeypatch, caplog):
    """A replica of one rank logs a failed capture and decodes eagerly. A tensor-parallel rank must
    not: the others would capture on into collectives it never joins. Here every capture fails,
    as there is no CUDA."""
    from model.parallel import ParallelContext

    with caplog.at_level("WARNING", logger="model.engine.cuda_graphs"):
        alone = DecodeGraphs(model, [], [1, 2], pages=4, block_size=16, scratch_block=0, capture=True)
    assert not alone.captured and all(e.graph is None for e in alone.by_size.values())
    assert "CUDA graph capture failed, decoding eagerly" in caplog.text
    monkeypatch.setattr(model, "tp", ParallelContext(rank=1, world_size=2))
    with pytest.raises(RuntimeError, match=r"capture failed on rank 1: .*cuda_graph_batch_sizes to \[\]"):
        DecodeGraphs(model, [], [1, 2], pages=4, block_size=16, scratch_block=0, capture=True)


def test_static_decode_rows_leave_stale_pages_unread(mistral_12b, model, monkeypatch):
    """A static decode step writes each row's own pages only: when a long sequence finishes and a
    shorter one (or padding) takes its row, the long one's pages stay past the shorter context.
    The masks never read them: tokens and logprobs equal the torch backend's."""
    from model.layers import flex_paged

    monkeypatch.setattr(flex_paged, "COMPILE", False)
    reqs = [("long", list(range(100, 200)), 2), ("a", [1, 3, 100, 200], 6), ("b", [1, 5, 9], 6), ("c", [1, 7], 6)]

    def run(backend, **sizes):
        monkeypatch.setenv(BACKEND_ENV, backend)
        engine = build_local_engine(mistral_12b, model=model, num_blocks=256, **sizes)
        for rid, tokens, n in reqs:
            engine.add_request(rid, tokens, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                           top_logprobs=1))
        return engine, {rid: [(t, lp.logprob) for o in outs for t, lp in zip(o.token_ids, o.logprobs)]
                        for rid, outs in engine.run_to_completion().items()}

    _, expected = run("torch")
    engine, got = run("flex", decode_batch_sizes=[4])
    entry = engine.executor.runner.graphs.by_size[4]
    pages = (entry.seq_lens + 15) // 16
    assert any(entry.tables[i, pages[i]:].any() for i in range(4))  # stale pages were there to misread
    for rid in expected:
        assert [t for t, _ in got[rid]] == [t for t, _ in expected[rid]], rid
        assert max(abs(a - b) for (_, a), (_, b) in zip(got[rid], expected[rid])) <= 1e-5, rid


def test_flex_attention_backend_equals_torch_backend(mistral_12b, model, requests_8, monkeypatch):
    """The engine on the FlexAttention backend (CUDA's) gives the torch backend's greedy tokens and
    logprobs: image prefills, chunked prefills (a 64-token step budget), decodes on the static
    buffers that CUDA graphs replay (padded to the next size; here not captured), and a prompt sent
    twice so that its pages are shared through the prefix cache. Eager FlexAttention applies the
    block masks' functions alone (test_attention checks the compiled kernel's page lists)."""
    from model.layers import flex_paged

    monkeypatch.setattr(flex_paged, "COMPILE", False)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, top_logprobs=2)
    reqs = requests_8[:5] + [("again", *requests_8[2][1:])]

    def tokens_and_logprobs(backend):
        monkeypatch.setenv("PIXTRAL_SERVE_ATTENTION", backend)
        engine = build_local_engine(mistral_12b, model=model, num_blocks=256, max_num_batched_tokens=64,
                                    decode_batch_sizes=[1, 2, 4, 8])
        assert engine.executor.runner.attention_backend == backend
        for rid, tokens, _, feats in reqs:
            engine.add_request(rid, tokens, params, feats, [f"{rid}-{k}" for k in range(len(feats))])
        out = {rid: [(t, lp.logprob) for o in outs for t, lp in zip(o.token_ids, o.logprobs)]
               for rid, outs in engine.run_to_completion().items()}
        assert engine.blocks.prefix_hit_blocks > 0  # "again" read r2's pages
        return out

    calls = []
    paged = flex_paged.paged_attention
    monkeypatch.setattr(flex_paged, "paged_attention", lambda *a: calls.append(1) or paged(*a))
    static_sizes = []
    run_static = DecodeGraphs.run
    monkeypatch.setattr(DecodeGraphs, "run", lambda self, size, chunks: static_sizes.append((size, len(chunks)))
                        or run_static(self, size, chunks))
    torch_out = tokens_and_logprobs("torch")
    assert not calls and not static_sizes
    flex_out = tokens_and_logprobs("flex")
    assert calls and (8, 6) in static_sizes  # 6 decoding sequences on the static size 8
    for rid in torch_out:
        assert [t for t, _ in flex_out[rid]] == [t for t, _ in torch_out[rid]], rid
        assert max(abs(a - b) for (_, a), (_, b) in zip(flex_out[rid], torch_out[rid])) <= 1e-5, rid


def test_kv_budget_from_a_profile_names_the_numbers_when_too_small():
    from model.engine.local_executor import _blocks_or_fail, cuda_kv_budget

    gib = 1 << 30
    # 80 GiB GPU, 50 GiB in use after loading, a 10 GiB activation peak: 0.9 x 80 - 50 - 10 = 12 GiB
    assert cuda_kv_budget(80 * gib, 30 * gib, 10 * gib, 0.9) == 12 * gib
    assert _blocks_or_fail(12 * gib, 1 << 20, 16, 8192, lambda: "") == 12 * 1024
    with pytest.raises(MemoryError, match=r"no room for the KV cache: -2048 MiB left \(the reason\).*"
                                          r"a step needs 8192 tokens.*max_num_batched_tokens.*gpu_memory_utilization"):
        _blocks_or_fail(cuda_kv_budget(80 * gib, 20 * gib, 14 * gib, 0.9), 1 << 20, 16, 8192, lambda: "the reason")


@pytest.mark.parametrize("checkpoint", ["mistral_12b", "mistral_large"])
def test_profile_forward_runs_a_full_step_with_image_embeddings(checkpoint, request):
    """The profiling pass runs the largest step's shapes (and the adapter's patch merge on Large)."""
    from model.engine.model_runner import profile_forward

    profile_forward(load_model(request.getfixturevalue(checkpoint), with_vision_encoder=False), 300)
