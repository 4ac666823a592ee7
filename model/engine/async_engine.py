"""An asyncio face for the engine: `async for out in engine.generate(...)`, with abort on cancel.

The engine steps in one background thread (model compute blocks); coroutines talk to it only
through a command queue and per-request asyncio queues, so the engine itself needs no locks.

A stream may coalesce (`stream_interval_s`): a request's first output and its last go out at once,
and in between at most one output per interval, holding every token made meanwhile. Behind a Ray
Serve replica each output is one message to the ingress, and that message, not the step, becomes
what limits a fast engine: on the tiny demo checkpoint, whose steps take a few milliseconds as a
GPU's do, sending only each request's first and last output carried 2.6x the tokens/s at 32
concurrent requests. Ray Serve LLM batches its streams for the same reason (every 50 ms, the first
token included).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from model.engine.guided import GrammarError
from model.engine.llm_engine import EngineStats, LLMEngine, RequestError, RequestOutput
from model.engine.model_runner import ImageFeatures
from model.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine stopped (a tensor-parallel rank died, the device failed); it takes no more work.

    `retryable`: this request was not in the step that stopped the engine, so it cannot have caused
    it and another replica may run it. A request that was in that step is not retried: if it was
    the cause, a retry would take down the next replica too.
    """

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


def ends_merge(out: RequestOutput, boundaries: frozenset[int]) -> bool:
    """An output nothing later is merged into: the last, or one holding a boundary token (a reader
    splits the stream there, as the ingress does at [TOOL_CALLS]: content before, calls after)."""
    return out.finished or not boundaries.isdisjoint(out.token_ids)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    ended: asyncio.Event  # the request's last output (or its error) is queued: send now, hold nothing

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self._arrive, item)

    def _arrive(self, item: RequestOutput | BaseException) -> None:
        self.outputs.put_nowait(item)
        if isinstance(item, BaseException) or item.finished:
            self.ended.set()

    def drain(self, held: RequestOutput, boundaries: frozenset[int]) -> tuple[RequestOutput, BaseException | None]:
        """`held` merged with the outputs queued behind it, up to one that ends a merge, and an
        error queued after them."""
        outputs = [held]
        while not ends_merge(outputs[-1], boundaries) and not self.outputs.empty():
            item = self.outputs.get_nowait()
            if isinstance(item, BaseException):
                return RequestOutput.merge(outputs), item
            outputs.append(item)
        return RequestOutput.merge(outputs), None


class AsyncEngine:
    def __init__(self, engine: LLMEngine, stream_interval_s: float = 0.0, step_timeout_s: float | None = None) -> None:
        self.engine = engine
        self.stream_interval_s = stream_interval_s
        # A step that never returns (a hung GPU: the engine thread waits in the sampler's read-back)
        # leaves the thread alive and no error set: `healthy` would pass forever while every
        # request on this engine waited. Past this many seconds in one step, it is unhealthy.
        self.step_timeout_s = step_timeout_s
        self._step_started: float | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive() and self.stuck_for() is None

    def stuck_for(self) -> float | None:
        """How long the running step has taken, once that is over `step_timeout_s`; else None."""
        started = self._step_started
        if self.step_timeout_s is None or started is None:
            return None
        running = time.monotonic() - started
        return running if running > self.step_timeout_s else None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       images: list[ImageFeatures] | None = None,
                       image_hashes: list[str] | None = None,
                       stream_boundaries: frozenset[int] = frozenset(),
                       stream_interval_s: float | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come, coalesced per `stream_interval_s` (default: the
        engine's); an output holding one of `stream_boundaries` ends the output it is merged into."""
        interval = self.stream_interval_s if stream_interval_s is None else stream_interval_s
        if not self.healthy:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        if params.grammar is not None and self.engine.grammars is not None:
            # compile (or find in the cache) off the engine thread and the event loop: a complex
            # schema takes a while, and llguidance releases the GIL meanwhile
            try:
                await asyncio.to_thread(self.engine.grammars.compile, params.grammar)
            except GrammarError as exc:
                raise RequestError(f"the grammar cannot be compiled: {exc}") from exc
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), asyncio.Event())
        self._streams[request_id] = stream
        # the engine thread takes the request at its next step; its queue time starts now
        self._send(("add", request_id, prompt_token_ids, params, images, image_hashes, time.monotonic()))
        finished = False
        sent_at: float | None = None
        try:
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                error = None
                if interval > 0 and sent_at is not None and not ends_merge(item, stream_boundaries):
                    hold = sent_at + interval - loop.time()
                    if hold > 0:
                        try:
                            await asyncio.wait_for(stream.ended.wait(), hold)
                        except asyncio.TimeoutError:
                            pass
                    item, error = stream.drain(item, stream_boundaries)
                finished = item.finished
                sent_at = loop.time()
                yield item
                if error is not None:
                    raise error
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # cancelled (client went away) or failed: free its blocks now
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished:
                self._wake.wait()
                self._wake.clear()
                continue
            self._step_started = time.monotonic()
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # the executor failed (a request's own faults fail it alone)
                log.exception("engine stopped")
                self.error = exc
                self._fail_all(f"the engine stopped: {type(exc).__name__}", self.engine.in_step)
                return
            finally:
                self._step_started = None
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self.engine.abort(command[1])
                continue
            _, request_id, tokens, params, images, hashes, arrival = command
            try:
                self.engine.add_request(request_id, tokens, params, images, hashes, arrival)
            except Exception as exc:  # noqa: BLE001 - a malformed request is refused, alone
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put(exc if isinstance(exc, RequestError) else RequestError(f"malformed request: {exc!r}"))

    def _fail_all(self, message: str, in_step: set[str]) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(EngineDeadError(message, retryable=request_id not in in_step))
