"""An asyncio face for the engine: `async for out in engine.generate(...)`, with abort on cancel.

The engine steps in one background thread (model compute blocks); coroutines talk to it only
through a command queue and per-request asyncio queues, so the engine itself needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
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


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.outputs.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       images: list[ImageFeatures] | None = None,
                       image_hashes: list[str] | None = None) -> AsyncIterator[RequestOutput]:
        if not self.healthy:
            raise EngineDeadError(f"the engine has stopped: {self.error!r}")
        if params.grammar is not None and self.engine.grammars is not None:
            # compile (or find in the cache) off the engine thread and the event loop: a complex
            # schema takes a while, and llguidance releases the GIL meanwhile
            try:
                await asyncio.to_thread(self.engine.grammars.compile, params.grammar)
            except GrammarError as exc:
                raise RequestError(f"the grammar cannot be compiled: {exc}") from exc
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._send(("add", request_id, prompt_token_ids, params, images, image_hashes))
        finished = False
        try:
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
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
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # the executor failed (a request's own faults fail it alone)
                log.exception("engine stopped")
                self.error = exc
                self._fail_all(f"the engine stopped: {type(exc).__name__}", self.engine.in_step)
                return
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
            _, request_id, tokens, params, images, hashes = command
            try:
                self.engine.add_request(request_id, tokens, params, images, hashes)
            except Exception as exc:  # noqa: BLE001 - a malformed request is refused, alone
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put(exc if isinstance(exc, RequestError) else RequestError(f"malformed request: {exc!r}"))

    def _fail_all(self, message: str, in_step: set[str]) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(EngineDeadError(message, retryable=request_id not in in_step))
