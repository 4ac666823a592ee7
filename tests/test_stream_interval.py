"""A coalescing stream (`AsyncEngine(stream_interval_s=...)`) carries exactly what the plain stream
does, in fewer outputs: its first output at once and alone, its last at once, never merged past a
boundary token, and an error after the tokens made before it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from model import load_model
from model.engine.async_engine import AsyncEngine, _Stream
from model.engine.llm_engine import RequestOutput
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from tests.helpers import encode_chat

PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, top_logprobs=2)


@pytest.fixture(scope="module")
def model(mistral_12b):
    return load_model(mistral_12b)


@pytest.fixture(scope="module")
def prompt(mistral_12b):
    return encode_chat(mistral_12b, ["Tell me a story"])[0]


def stream(mistral_12b, model, prompt, interval: float, params: SamplingParams = PARAMS,
           boundaries: frozenset[int] = frozenset()) -> tuple[list[RequestOutput], float]:
    engine = AsyncEngine(build_local_engine(mistral_12b, model=model, num_blocks=64), stream_interval_s=interval)

    async def collect() -> list[RequestOutput]:
        return [out async for out in engine.generate("r", prompt, params, stream_boundaries=boundaries)]

    start = time.perf_counter()
    try:
        outputs = asyncio.run(collect())
    finally:
        engine.shutdown()
    return outputs, time.perf_counter() - start


def joined(outputs: list[RequestOutput]) -> tuple:
    last = outputs[-1]
    return ([t for o in outputs for t in o.token_ids], "".join(o.text for o in outputs),
            [lp for o in outputs for lp in o.logprobs], last.finish_reason, last.prompt_tokens,
            last.completion_tokens, last.cached_tokens)


def test_coalesced_stream_carries_the_plain_stream(mistral_12b, model, prompt):
    plain, _ = stream(mistral_12b, model, prompt, 0.0)
    coalesced, _ = stream(mistral_12b, model, prompt, 0.5)
    assert len(plain) == PARAMS.max_tokens  # one output per step
    assert joined(coalesced) == joined(plain)
    assert len(coalesced[0].token_ids) == 1 and coalesced[0].queue_time_s is not None  # the first at once
    assert len(coalesced) < len(plain) // 4
    assert [o.finished for o in coalesced] == [False] * (len(coalesced) - 1) + [True]


def test_the_last_output_is_not_held(mistral_12b, model, prompt):
    """With a 5 s interval, the tokens after the first wait only for the request's end."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs, elapsed = stream(mistral_12b, model, prompt, 5.0, params)
    assert [len(o.token_ids) for o in outputs] == [1, 7]
    assert elapsed < 2.5


def test_no_output_is_merged_past_a_boundary_token(mistral_12b, model, prompt):
    plain, _ = stream(mistral_12b, model, prompt, 0.0)
    tokens = joined(plain)[0]
    # a token first seen at position 5 or later: the outputs before it merge up to it, none past it
    at = next(i for i in range(5, len(tokens)) if tokens[i] not in tokens[:i])
    boundary = tokens[at]
    coalesced, _ = stream(mistral_12b, model, prompt, 5.0, boundaries=frozenset([boundary]))
    assert joined(coalesced) == joined(plain)
    ends = [o for o in coalesced if boundary in o.token_ids]
    assert ends and all(o.token_ids.index(boundary) == len(o.token_ids) - 1 for o in ends)
    assert sum(len(o.token_ids) for o in coalesced[:coalesced.index(ends[0]) + 1]) == at + 1


def test_an_error_comes_after_the_tokens_made_before_it():
    async def main():
        s = _Stream(asyncio.get_running_loop(), asyncio.Queue(), asyncio.Event())
        for i in (1, 2):
            s.outputs.put_nowait(RequestOutput("r", [10 + i], f"t{i}", completion_tokens=i + 1))
        s.outputs.put_nowait(RuntimeError("engine stopped"))
        s.outputs.put_nowait(RequestOutput("r", [99], "late"))
        return s.drain(RequestOutput("r", [10], "t0", completion_tokens=1), frozenset())

    merged, error = asyncio.run(main())
    assert (merged.token_ids, merged.text, merged.completion_tokens) == ([10, 11, 12], "t0t1t2", 3)
    assert isinstance(error, RuntimeError)


def test_a_stream_cancelled_while_held_frees_its_request(mistral_12b, model, prompt):
    """A client that leaves while its tokens wait for the interval aborts the request as before."""
    params = SamplingParams(max_tokens=900, temperature=0.0, ignore_eos=True)
    engine = AsyncEngine(build_local_engine(mistral_12b, model=model, num_blocks=64), stream_interval_s=5.0)

    async def leave_early() -> None:
        outputs = engine.generate("r", prompt, params)
        await anext(outputs)  # the first output, at once
        waiting = asyncio.ensure_future(anext(outputs))  # now held for the interval
        await asyncio.sleep(0.2)
        assert not waiting.done()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await outputs.aclose()
        for _ in range(100):  # the engine thread takes the abort at its next step
            if not engine.engine.has_unfinished:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the request was not aborted")

    try:
        asyncio.run(leave_early())
        stats = engine.engine.stats()
        assert stats.running == 0 and engine.healthy
        assert stats.generation_tokens < 800  # stopped early, not run to its 900 tokens
    finally:
        engine.shutdown()


def test_queue_time_counts_the_wait_for_the_running_step(mistral_12b, model, prompt):
    """A request that arrives while a step runs waits for that step before the engine thread takes
    it; `queue_time_s` (the pixtral_queue_time_seconds metric) counts that wait."""
    engine = AsyncEngine(build_local_engine(mistral_12b, model=model, num_blocks=64))
    inside, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def step():
        if not release.is_set():
            inside.set()
            release.wait(10)
        return real_step()

    engine.engine.step = step

    async def main() -> RequestOutput:
        first = engine.generate("a", prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        running = asyncio.ensure_future(anext(first))
        await asyncio.to_thread(inside.wait, 10)  # the engine thread is now inside a step
        second = engine.generate("b", prompt, SamplingParams(max_tokens=1, temperature=0.0))
        arrived = asyncio.ensure_future(anext(second))
        await asyncio.sleep(0.3)
        release.set()
        out = await arrived
        await running
        await first.aclose()
        await second.aclose()
        return out

    try:
        out = asyncio.run(main())
    finally:
        release.set()
        engine.shutdown()
    assert out.queue_time_s is not None and out.queue_time_s >= 0.3
