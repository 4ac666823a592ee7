"""One request's fault fails that request alone: the engine and its batch mates carry on.

Faults come in through the real paths (a NaN image, image features of the wrong width, a tiny
temperature); only the executor-death case injects its fault, since it stands for a lost device.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from model import load_model
from model.engine.async_engine import AsyncEngine, EngineDeadError
from model.engine.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from model.engine.llm_engine import ExecutorDeadError, RequestError
from model.engine.local_executor import build_local_engine
from model.engine.model_runner import ImageFeatures
from model.engine.sampler import SamplerState, sample
from model.engine.sampling_params import SamplingParams
from tests.helpers import encode_chat, image_features, random_image

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)


@pytest.fixture(scope="module")
def model(mistral_12b):
    return load_model(mistral_12b)


@pytest.fixture(scope="module")
def mates(mistral_12b, model):
    """Three ordinary requests (one with an image), and what each generates alone."""
    specs = [(["Hello there"], GREEDY), (["Describe", random_image(48, 32, 1)], SEEDED), (["Count to five"], SEEDED)]
    reqs = []
    for i, (parts, params) in enumerate(specs):
        tokens, pixels = encode_chat(mistral_12b, parts)
        reqs.append((f"mate{i}", tokens, params, image_features(model, pixels)))
    engine = build_local_engine(mistral_12b, model=model, num_blocks=128)
    alone = {}
    for rid, tokens, params, feats in reqs:
        engine.add_request(rid, tokens, params, feats)
        alone[rid] = tokens_of(engine.run_to_completion()[rid])
    return reqs, alone


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def run_with(engine, mates, rid, tokens, params, feats):
    reqs, _ = mates
    for mate_id, mate_tokens, mate_params, mate_feats in reqs[:1]:
        engine.add_request(mate_id, mate_tokens, mate_params, mate_feats)
    engine.add_request(rid, tokens, params, feats)
    for mate_id, mate_tokens, mate_params, mate_feats in reqs[1:]:
        engine.add_request(mate_id, mate_tokens, mate_params, mate_feats)
    return engine.run_to_completion()


def assert_mates_unharmed(results, mates, engine) -> None:
    reqs, alone = mates
    for rid, *_ in reqs:
        assert results[rid][-1].failure is None and tokens_of(results[rid]) == alone[rid], rid
    stats = engine.stats()
    assert stats.free_blocks == stats.num_blocks and not engine.has_unfinished


def test_unsampleable_row_fails_alone(mistral_12b, model, mates):
    """NaN image features (say an fp16 overflow in a vision replica) give NaN logits for that
    sequence only; sampling them fails that request, in the same step as its mates' tokens."""
    tokens, pixels = encode_chat(mistral_12b, ["What is this?", random_image(40, 40, 2)])
    feats = image_features(model, pixels)
    poisoned = [ImageFeatures(torch.full_like(f.features, float("nan")), f.grid) for f in feats]
    engine = build_local_engine(mistral_12b, model=model, num_blocks=128)
    results = run_with(engine, mates, "nan", tokens, SamplingParams(max_tokens=10, temperature=1.0), poisoned)
    bad = results["nan"][-1]
    assert bad.finished and bad.finish_reason == "error" and bad.failure.kind == "failed", bad
    assert "sampling failed" in bad.failure.message
    assert_mates_unharmed(results, mates, engine)
    assert engine.failed_requests_total == 1


def test_failing_step_is_isolated_to_its_request(mistral_12b, model, mates):
    """Image features of the wrong width pass the engine's row check but make the step's forward
    pass raise; the engine reruns the step one sequence at a time and fails only that request."""
    tokens, pixels = encode_chat(mistral_12b, ["Look", random_image(32, 32, 3)])
    feats = image_features(model, pixels)
    narrow = [ImageFeatures(f.features[:, :-3].clone(), f.grid) for f in feats]
    engine = build_local_engine(mistral_12b, model=model, num_blocks=128)
    results = run_with(engine, mates, "narrow", tokens, GREEDY, narrow)
    bad = results["narrow"][-1]
    assert bad.finish_reason == "error" and bad.failure.kind == "failed" and "RuntimeError" in bad.failure.message
    assert_mates_unharmed(results, mates, engine)
    # the engine is still whole: the same prompt with good features now runs
    engine.add_request("good", tokens, GREEDY, feats)
    assert len(tokens_of(engine.run_to_completion()["good"])) == GREEDY.max_tokens


def test_tiny_temperature_is_greedy_not_fatal(mistral_12b, model, mates):
    tokens, _ = encode_chat(mistral_12b, ["Hello there"])
    assert SamplingParams(temperature=1e-38).greedy
    engine = build_local_engine(mistral_12b, model=model, num_blocks=128)
    results = run_with(engine, mates, "tiny", tokens, SamplingParams(max_tokens=10, temperature=1e-38,
                                                                      ignore_eos=True), [])
    assert tokens_of(results["tiny"]) == mates[1]["mate0"]  # the same prompt, greedy
    assert_mates_unharmed(results, mates, engine)


def test_sampler_survives_extreme_logits():
    """Huge logits and a small (legal) temperature: (logits - max) / T never overflows to NaN."""
    logits = torch.tensor([[3e38, 2.9e38, -3e38], [1.0, float("nan"), 0.0]])
    states = [SamplerState.create(SamplingParams(temperature=1e-5, seed=1), torch.device("cpu")),
              SamplerState.create(SamplingParams(temperature=1.0, seed=1), torch.device("cpu"))]
    tokens, _, failed = sample(logits, states)
    assert tokens[0] == 0 and list(failed) == [1] and tokens[1] == -1


def test_out_of_vocabulary_prompt_is_refused(mistral_12b, model):
    engine = build_local_engine(mistral_12b, model=model, num_blocks=16)
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request("oov", [1, 3, model.args.vocab_size], GREEDY)
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request("neg", [1, -5, 4], GREEDY)
    assert not engine.has_unfinished


class DyingExecutor:
    """Stands for a lost device: the third step raises ExecutorDeadError."""

    def __init__(self, inner) -> None:
        self.inner, self.steps = inner, 0

    def execute(self, step):
        self.steps += 1
        if self.steps == 3:
            raise ExecutorDeadError("device lost")
        return self.inner.execute(step)


def test_executor_death_blames_only_the_running_requests(mistral_12b, model):
    """Requests in the step that stopped the engine may have caused it and are not retried;
    requests still waiting could not have, and are marked retryable (another replica takes them)."""
    engine = build_local_engine(mistral_12b, model=model, num_blocks=128, max_num_seqs=1)
    engine.executor = DyingExecutor(engine.executor)
    tokens, _ = encode_chat(mistral_12b, ["Hello"])
    async_engine = AsyncEngine(engine)

    async def consume(rid: str):
        try:
            async for _ in async_engine.generate(rid, tokens, SamplingParams(max_tokens=50, temperature=0.0)):
                pass
        except EngineDeadError as exc:
            return exc
        return None

    async def main():
        return await asyncio.gather(consume("running"), consume("waiting"))

    try:
        running, waiting = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert isinstance(running, EngineDeadError) and not running.retryable
    assert isinstance(waiting, EngineDeadError) and waiting.retryable
    assert not async_engine.healthy


def test_detokenizer_releases_invalid_bytes_instead_of_redecoding_forever():
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return "\ufffd" * len(ids)  # bytes that never complete a character

    detok = IncrementalDetokenizer(decode)
    text = "".join(detok.add(7) for _ in range(200)) + detok.flush()
    assert text and max(decoded) <= 2 * MAX_PENDING_TOKENS  # decoded spans stay short


def test_vision_batch_isolates_an_image_that_cannot_be_encoded(mistral_12b):
    """A batch holding one image that cannot be encoded: its mates get exactly their own features."""
    import numpy as np

    from model.loader import load_vision_encoder
    from serving.images import ImagePayload
    from serving.vision_encoder_server import ImageEncodeError, VisionEncoderServer

    server = object.__new__(VisionEncoderServer.func_or_class)  # the replica's logic, without Serve
    server.encoder, server.device, server.error = load_vision_encoder(mistral_12b), torch.device("cpu"), None
    server.max_batch_patches = 1 << 15
    rng = np.random.default_rng(0)
    good = [ImagePayload(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (w, h), f"g{i}")
            for i, (w, h) in enumerate([(48, 32), (32, 64)])]
    four_channels = ImagePayload(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), (32, 32), "bad")
    together = server._encode_now([good[0], four_channels, good[1]])
    assert isinstance(together[1], ImageEncodeError)
    for payload, result in zip(good, together[::2]):
        alone = server._encode_now([payload])[0]
        assert torch.equal(result.features, alone.features) and result.grid == alone.grid
    server.check_health()  # an image's failure is not the replica's


def test_image_encode_errors_are_told_apart_from_replica_failures():
    from ray.exceptions import ActorDiedError

    from serving.ingress import _caused_by
    from serving.vision_encoder_server import ImageEncodeError

    try:
        try:
            raise ImageEncodeError("bad image")
        except ImageEncodeError as inner:
            raise RuntimeError("while resolving the decoder's arguments") from inner
    except RuntimeError as outer:
        assert _caused_by(outer, ImageEncodeError)
    assert not _caused_by(ActorDiedError(), ImageEncodeError)


def test_a_step_that_never_returns_makes_the_engine_unhealthy(mistral_12b, model):
    """A hung device blocks the engine thread inside a step, alive and without an error: past
    `step_timeout_s` in one step the engine reports itself unhealthy (the replica's health check
    fails and Serve replaces it), and healthy again if the step does return."""
    import threading
    import time

    engine = build_local_engine(mistral_12b, model=model, num_blocks=64)
    release = threading.Event()
    step = engine.step
    engine.step = lambda: release.wait(30) and step()
    async_engine = AsyncEngine(engine, step_timeout_s=0.3)

    async def one_request():
        return [o async for o in async_engine.generate("r", [1, 3, 100, 200], SamplingParams(max_tokens=2))]

    try:
        assert async_engine.healthy and async_engine.stuck_for() is None

        async def main():
            task = asyncio.ensure_future(one_request())
            deadline = time.monotonic() + 10
            while async_engine.healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            stuck = async_engine.stuck_for()
            healthy_while_stuck = async_engine.healthy
            release.set()
            return stuck, healthy_while_stuck, await task

        stuck, healthy_while_stuck, outputs = asyncio.run(main())
        assert not healthy_while_stuck and stuck is not None and stuck > 0.3
        assert outputs and outputs[-1].finished
        assert async_engine.healthy  # the step returned: a slow step, not a dead engine
    finally:
        release.set()
        async_engine.shutdown()
