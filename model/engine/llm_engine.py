"""The engine: requests in, token/text deltas out. One step = schedule, run, postprocess, collect.

Pure bookkeeping around an executor that runs the model (in this process, or on the ranks of a
tensor-parallel group elsewhere); the executor only ever sees `StepInput` messages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from model.engine.block_manager import BlockManager
from model.engine.detokenizer import IncrementalDetokenizer
from model.engine.guided import GrammarCompiler, GrammarError
from model.engine.model_runner import ImageFeatures, SeqChunk, StepInput, StepOutput
from model.engine.sampler import TokenLogprobs
from model.engine.sampling_params import SamplingParams
from model.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from model.engine.sequence import ImageSpan, Sequence

# A constrained request starts checking, this many tokens before its budget ends, whether it must
# finish its grammar now; the margin covers a token that opens more than it closes (such as `{"`
# or a forced key) between two checks.
CLOSING_WINDOW = 64
CLOSING_MARGIN = 16

log = logging.getLogger(__name__)


class Executor(Protocol):
    def execute(self, step: StepInput) -> StepOutput: ...


class ExecutorDeadError(RuntimeError):
    """The executor cannot run another step: a tensor-parallel rank died, or the device is lost.

    Executors raise this for faults of their own; any other exception from a step is taken to
    belong to one of the step's requests, which the engine then finds and fails alone.
    """


@dataclass
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_model_len: int = 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    eos_token_id: int = 2
    image_token_id: int = 10
    image_end_token_id: int = 13
    spatial_merge_size: int = 1
    vocab_size: int | None = None  # prompts with ids outside [0, vocab_size) are refused

    def __post_init__(self) -> None:
        capacity = self.num_blocks * self.block_size
        if self.max_model_len > capacity:
            # One sequence must always fit alone, or preemption could never make progress.
            log.warning("max_model_len %d exceeds the KV cache (%d tokens); lowering it", self.max_model_len, capacity)
            self.max_model_len = capacity


class RequestError(ValueError):
    """A request the engine cannot run (too long, malformed images); nothing was scheduled."""


@dataclass
class RequestFailure:
    """Why a request ended without finishing normally (`RequestOutput.failure`).

    kind: "invalid" (the request cannot run: a client error), "failed" (its step raised and the
    request failed alone; the engine and its other requests carry on) or "unavailable" (the
    engine stopped). `retryable`: another replica may take it, because it was not running in the
    step that stopped the engine (so it cannot have caused that).
    """

    kind: str
    message: str
    retryable: bool = False


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # new tokens since the previous output
    text: str  # new final text since the previous output
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_time_s: float | None = None  # on a request's first output: wait before its first step
    failure: RequestFailure | None = None  # with finish_reason "error"

    @staticmethod
    def merge(outputs: list[RequestOutput]) -> RequestOutput:
        """Consecutive outputs of one request as one: their new tokens, text and logprobs joined, the
        counts and the ending as of the last, the queue time as of the first."""
        if len(outputs) == 1:
            return outputs[0]
        first, last = outputs[0], outputs[-1]
        return dataclasses.replace(last, token_ids=[t for o in outputs for t in o.token_ids],
                                   text="".join(o.text for o in outputs),
                                   logprobs=[lp for o in outputs for lp in o.logprobs],
                                   queue_time_s=first.queue_time_s)


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_usage: float
    free_blocks: int
    num_blocks: int
    preemptions: int
    prefix_queried_blocks: int
    prefix_hit_blocks: int
    prompt_tokens: int
    generation_tokens: int
    failed_requests: int  # failed alone (their step raised); the engine carried on


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    pending_images: list[ImageFeatures] | None
    announced: bool = False  # the runner knows this sequence's sampling params
    matcher: object | None = None  # llguidance matcher of its grammar (response_format), fed every token
    grammar_active: bool = False  # the grammar has started (at once, or at its trigger token)
    trigger_cost: int = 0  # tokens from the trigger token to the grammar's end, the shortest way known
    closing: bool = False  # out of budget: forcing the shortest way to the grammar's end
    check_closing_at: int = 0  # budget left at which to check next whether it must close (0: from the window on)


class LLMEngine:
    def __init__(self, executor: Executor, config: EngineConfig, decode: Callable[[list[int]], str],
                 grammars: GrammarCompiler | None = None) -> None:
        self.executor = executor
        self.config = config
        self.decode = decode
        self.grammars = grammars
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.blocks)
        self.requests: dict[str, _Request] = {}
        self._finished_ids: list[int] = []  # sequences whose runner state can go
        self._aborted: list[RequestOutput] = []
        self.in_step: set[str] = set()  # request ids of the step being run (blamed if it kills the executor)
        self.failed_requests_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # -- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    images: list[ImageFeatures] | None = None, image_hashes: list[str] | None = None,
                    arrival_time: float | None = None) -> None:
        """`arrival_time` (time.monotonic()): when the request reached the engine's caller, if it
        waited before this call (AsyncEngine's requests wait for the running step); its queue time
        counts from there."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise RequestError("the prompt is empty")
        vocab = self.config.vocab_size
        if vocab is not None and not all(0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"the prompt has token ids outside this model's vocabulary [0, {vocab})")
        if vocab is not None and any(t >= vocab for t in params.logit_bias):
            raise RequestError(f"logit_bias names token ids outside this model's vocabulary [0, {vocab})")
        matcher = None
        trigger_cost = 0
        if params.grammar is not None:
            if self.grammars is None:
                raise RequestError("this engine has no grammar support (no tokenizer given)")
            try:
                matcher = self.grammars.matcher(params.grammar)
            except GrammarError as exc:
                raise RequestError(f"the grammar cannot be compiled: {exc}") from exc
            if params.grammar_trigger is not None:
                trigger_cost = self._trigger_cost(matcher, params.grammar_trigger)
        if len(prompt_token_ids) >= self.config.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_token_ids)} tokens; this model's maximum context "
                               f"length is {self.config.max_model_len} (prompt plus at least one generated token)")
        images = images or []
        spans = self._image_spans(prompt_token_ids, images, image_hashes or [str(i) for i in range(len(images))])
        seq = Sequence(request_id, list(prompt_token_ids), params, spans)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        # stop strings apply to free text, never inside grammar-constrained output (they would cut the JSON)
        from_start = params.grammar is not None and params.grammar_trigger is None
        self.requests[request_id] = _Request(
            seq, IncrementalDetokenizer(self.decode, [] if from_start else params.stop), images or None,
            matcher=matcher, grammar_active=from_start, trigger_cost=trigger_cost)
        self.scheduler.add(seq)
        self.prompt_tokens_total += len(prompt_token_ids)

    def _image_spans(self, tokens: list[int], images: list[ImageFeatures], hashes: list[str]) -> list[ImageSpan]:
        """Locate each image's tokens ([IMG]... up to its [IMG_END]) and check its feature count."""
        ends = [i for i, t in enumerate(tokens) if t == self.config.image_end_token_id]
        if len(ends) != len(images) or len(hashes) != len(images):
            raise RequestError(f"the prompt has {len(ends)} images but {len(images)} were given")
        spans, start = [], 0
        merge = self.config.spatial_merge_size ** 2
        for end, img, h in zip(ends, images, hashes):
            first = tokens.index(self.config.image_token_id, start)
            n_slots = tokens[first:end].count(self.config.image_token_id)
            rows, (gh, gw) = img.features.shape[0], img.grid
            if rows != gh * gw or n_slots != rows // merge:
                raise RequestError(f"image {len(spans)} has {n_slots} [IMG] tokens but {rows} features "
                                   f"for a {gh}x{gw} patch grid")
            spans.append(ImageSpan(h, first, end + 1))
            start = end + 1
        return spans

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks. False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req.seq, "abort")
        self._finished_ids.append(req.seq.seq_id)
        self._aborted.append(self._output(req, [], "", [], finished=True))
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        step = self._step_input(chunks)
        self.in_step = {c.seq.request_id for c in chunks}
        failed = False
        try:
            result = self.executor.execute(step)
        except ExecutorDeadError:
            raise
        except Exception as exc:  # noqa: BLE001 - one of the step's requests is at fault, not the engine
            log.warning("a step of %d sequences failed (%s); running them one at a time to find which",
                        len(chunks), _describe(exc))
            self._finished_ids[:0] = step.finished  # the failed step may not have released them
            failed = True
        # The reruns start after the handler: its traceback holds the failed forward's tensors,
        # which a rerun after running out of GPU memory needs back.
        outputs = self._isolate(chunks, step) if failed else self._postprocess(chunks, result)
        self.in_step = set()
        outputs, self._aborted = self._aborted + outputs, []
        return outputs

    def _isolate(self, chunks: list[ScheduledChunk], step: StepInput) -> list[RequestOutput]:
        """Rerun a failed step one sequence at a time: the sequences that fail alone fail alone.

        Safe to repeat: a sequence's chunk rewrites the same KV slots, and sampling is the last
        thing a step does (a failed step sampled nothing).
        """
        outputs = []
        for chunk, message in zip(chunks, step.chunks):
            seq_id = message.seq_id
            alone = StepInput([message], {k: v for k, v in step.new_sequences.items() if k == seq_id},
                              {k: v for k, v in step.new_images.items() if k == seq_id})
            try:
                result = self.executor.execute(alone)
            except ExecutorDeadError:
                raise
            except Exception as exc:  # noqa: BLE001 - this request's own fault
                log.error("request %s failed in the engine: %s", chunk.seq.request_id, _describe(exc))
                outputs.append(self._fail(self.requests[chunk.seq.request_id], _describe(exc)))
                continue
            outputs += self._postprocess([chunk], result)
        return outputs

    def _fail(self, req: _Request, message: str) -> RequestOutput:
        """End one request with an error; the engine and every other request carry on."""
        self.failed_requests_total += 1
        self.scheduler.finish(req.seq, "error")
        self._finished_ids.append(req.seq.seq_id)
        del self.requests[req.seq.request_id]
        out = self._output(req, [], req.detok.flush(), [], finished=True)
        out.failure = RequestFailure("failed", f"the request failed in the engine ({message})")
        return out

    def _step_input(self, chunks: list[ScheduledChunk]) -> StepInput:
        step = StepInput([], finished=self._finished_ids)
        self._finished_ids = []
        now = time.monotonic()
        for c in chunks:
            seq = c.seq
            req = self.requests[seq.request_id]
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            if not req.announced:
                step.new_sequences[seq.seq_id] = seq.params
                req.announced = True
            if req.pending_images:
                step.new_images[seq.seq_id] = req.pending_images
                req.pending_images = None
            tokens = seq.token_ids[c.start:c.start + c.num_tokens]
            offset = 0
            if seq.images and c.start < len(seq.prompt_token_ids):
                offset = seq.prompt_token_ids[:c.start].count(self.config.image_token_id)
            allowed = self._grammar_mask(req) if c.samples and req.matcher is not None else None
            step.chunks.append(SeqChunk(seq.seq_id, tokens, c.start, list(seq.block_table), c.samples, offset, allowed))
        return step

    def _trigger_cost(self, matcher, trigger: int) -> int:
        """Tokens from a lazy grammar's trigger to its end, the shortest way the closing plan finds
        (a fresh matcher, rolled back after)."""
        if not matcher.consume_token(trigger):
            raise RequestError(f"the grammar does not start with its trigger token {trigger}")
        plan = self.grammars.closing_plan(matcher, CLOSING_WINDOW)
        matcher.rollback(1)
        return CLOSING_WINDOW if plan is None else 1 + len(plan)

    def _grammar_mask(self, req: _Request) -> torch.Tensor | None:
        """The tokens a constrained request may sample this step, as a packed mask (None: any).

        Near the end of its budget (max_tokens, or the context) a request is made to finish its
        grammar: once the shortest way to the end, plus a margin for a token that opens more than
        it closes, fills what is left, that way is forced token by token. A lazy grammar's trigger
        is banned when the rest could not finish. So JSON and tool calls parse even when cut short
        (finish_reason stays "length")."""
        seq = req.seq
        left = min(seq.params.max_tokens - len(seq.output_token_ids), self.config.max_model_len - len(seq))
        if not req.grammar_active:
            if left < req.trigger_cost + CLOSING_MARGIN:
                return self.grammars.all_but(seq.params.grammar_trigger)
            return None
        if req.closing or left <= min(CLOSING_WINDOW, req.check_closing_at or CLOSING_WINDOW):
            plan = self.grammars.closing_plan(req.matcher, left)
            if plan and (req.closing or len(plan) + CLOSING_MARGIN >= left):
                req.closing = True
                return self.grammars.only(plan[0])
            if plan:
                # each token adds at most CLOSING_MARGIN to the plan, so k tokens from now the
                # check can first matter when len(plan) + (k + 1) * margin >= left - k
                k = max(1, -(-(left - len(plan) - CLOSING_MARGIN) // (CLOSING_MARGIN + 1)))
                req.check_closing_at = left - k
        return self.grammars.allowed(req.matcher)

    def _postprocess(self, chunks: list[ScheduledChunk], result: StepOutput) -> list[RequestOutput]:
        outputs = []
        sampled = iter(zip(result.tokens, result.logprobs))
        for c in chunks:
            seq = c.seq
            seq.num_computed_tokens += c.num_tokens
            self.blocks.register_computed(seq)
            if not c.samples:
                continue
            token, logprobs = next(sampled)
            req = self.requests[seq.request_id]
            if seq.seq_id in result.failed:
                outputs.append(self._fail(req, result.failed[seq.seq_id]))
                continue
            seq.output_token_ids.append(token)
            self.generation_tokens_total += 1
            started = req.matcher is not None and not req.grammar_active and token == seq.params.grammar_trigger
            req.grammar_active |= started
            if req.grammar_active and not req.matcher.consume_token(token):
                outputs.append(self._fail(req, f"its grammar refused token {token}: {req.matcher.get_error()}"))
                continue
            try:
                outputs.append(self._advance(req, token, logprobs, started))
            except Exception as exc:  # noqa: BLE001 - e.g. detokenizing this request's text
                log.error("request %s failed after its step: %s", seq.request_id, _describe(exc))
                outputs.append(self._fail(req, _describe(exc)))
        return outputs

    def _advance(self, req: _Request, token: int, logprobs: TokenLogprobs | None,
                 grammar_started: bool = False) -> RequestOutput:
        seq, params = req.seq, req.seq.params
        reason = None
        if (token == self.config.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids:
            reason, text = "stop", req.detok.flush()
        else:
            text = req.detok.add(token)
            if grammar_started:
                # the free text before the trigger is final (this output carries all of it); what
                # follows is the grammar's, not searched for stop strings
                text += req.detok.flush()
                req.detok = IncrementalDetokenizer(self.decode)
            if req.detok.stopped:
                reason = "stop"
            elif req.matcher is not None and req.matcher.is_stopped():  # the grammar is complete
                reason, text = "stop", text + req.detok.flush()
            elif len(seq.output_token_ids) >= params.max_tokens or len(seq) >= self.config.max_model_len:
                reason, text = "length", text + req.detok.flush()
        if reason == "stop" and req.closing:
            reason = "length"  # finished early to fit the budget: the client should know it was cut
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._finished_ids.append(seq.seq_id)
            del self.requests[seq.request_id]
        return self._output(req, [token], text, [logprobs] if logprobs else [], finished=reason is not None)

    @staticmethod
    def _output(req: _Request, tokens: list[int], text: str, logprobs: list, finished: bool) -> RequestOutput:
        seq = req.seq
        queued = None
        if len(seq.output_token_ids) <= 1 and seq.first_scheduled_time is not None:
            queued = seq.first_scheduled_time - seq.arrival_time
        return RequestOutput(seq.request_id, tokens, text, logprobs, finished, seq.finish_reason if finished else None,
                             len(seq.prompt_token_ids), len(seq.output_token_ids), seq.num_cached_tokens, queued)

    # -- introspection ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        b = self.blocks
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), b.usage, b.num_free_blocks,
                           b.num_blocks, self.scheduler.num_preemptions, b.prefix_queried_blocks,
                           b.prefix_hit_blocks, self.prompt_tokens_total, self.generation_tokens_total,
                           self.failed_requests_total)

    def run_to_completion(self) -> dict[str, list[RequestOutput]]:
        """Step until every request is done; all outputs by request id (for tests and scripts)."""
        collected: dict[str, list[RequestOutput]] = {}
        while self.has_unfinished:
            for out in self.step():
                collected.setdefault(out.request_id, []).append(out)
        return collected


def _describe(exc: BaseException) -> str:
    """One line for a log or an error message: the type and the first line of the message."""
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
