"""The OpenAI-compatible HTTP front: auth, schema, images, tokenization, limits, SSE streaming.

A thin shell: it turns a chat request into prompt tokens and image payloads, asks the vision pool
for features and the decoder for tokens (the features go from one to the other directly), and
formats what comes back as OpenAI's JSON or server-sent events. With several models in one app,
the request's `model` field (a served name or an alias) picks the model, and with it the
tokenizer, the limits and the two pools.
"""


import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.config import find_tokenizer_file, load_model_args
from model.engine.llm_engine import RequestOutput
from model.engine.sampling_params import SamplingParams
from serving.config import AppConfig
from serving.decoder_server import GenerateRequest
from serving.direct_streams import DirectStream, Mailbox, Ordered
from serving.health import LoopLagMonitor, Readiness, start_heap_trimmer
from serving.images import ImageGeometry, PreparedImage, load_images, too_many_images
from serving.logs import setup_logging
from serving.metrics import count, metric
from serving.protocol import APIError, ChatCompletionRequest, ImagePart, bad_request, parse_request
from serving.tokenization import ChatTokenizer, EncodedPrompt, text_chars
from serving.tools import ToolCallStream, parse_tool_calls
from serving.vision_encoder_server import ImageEncodeError

log = logging.getLogger("pixtral_serve.ingress")

app = FastAPI(title="pixtral-serve", docs_url=None, redoc_url=None)
# the `model` label of requests that name no served model (set per ingress deployment by build_app)
MODEL_NAME_ENV = "PIXTRAL_SERVE_MODEL_NAME"


@app.middleware("http")
async def _count_requests(request: Request, call_next):
    status = 500  # unless a response says otherwise: an unhandled error becomes a 500 further out
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        route = request.scope.get("route")
        # the handler names the served model once it knows it (request.state lives in the scope)
        model = getattr(request.state, "model", None) or os.environ.get(MODEL_NAME_ENV, "")
        tags = {"model": model, "route": route.path if route else "unmatched", "status_code": str(status)}
        metric("pixtral_http_requests_total").inc(tags=tags)


def _error_response(request: Request, exc: APIError) -> JSONResponse:
    """OpenAI's error JSON, and one log line (never a traceback) for each refused request."""
    level = logging.WARNING if exc.status >= 500 else logging.INFO
    log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code or exc.type,
            exc.message[:200])
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(request, exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes (404), wrong methods (405) and the like, in OpenAI's shape."""
    codes = {404: "unknown_route", 405: "method_not_allowed"}
    message = f"{request.method} {request.url.path[:100]}: {exc.detail}"
    return _error_response(request, APIError(exc.status_code, message, "invalid_request_error",
                                             code=codes.get(exc.status_code), headers=dict(exc.headers or {})))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(request, bad_request("the request does not match this route's parameters"))


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)  # the trace stays in the log
    return JSONResponse(APIError(500, "internal error", "server_error").body(), status_code=500)


RETRIES = 3


class _VisionCalls:
    """The vision-pool calls of one request, shared by its n choices; re-issued on a retry."""

    def __init__(self, handle: DeploymentHandle, payloads: list) -> None:
        self.handle, self.payloads = handle, payloads
        self.attempt, self.responses = -1, []

    def get(self, attempt: int) -> list:
        if attempt > self.attempt:
            self.attempt = attempt
            self.responses = [self.handle.encode.remote(p) for p in self.payloads]
        return self.responses


@dataclass
class _Timing:
    """Per-request clock for the latency metrics, shared by its n choices."""

    start: float
    open_choices: int
    image_tokens: int
    first_token_seen: bool = False


async def _unavailable_as_503(stream) -> AsyncIterator:
    """Decoder overload or failure -> 503 with Retry-After (the client may retry), never a 500."""
    try:
        async for item in stream:
            yield item
    except BackPressureError:
        raise APIError(503, "the server is at capacity; retry shortly", "server_error", code="overloaded",
                       headers={"Retry-After": "2"}) from None
    except (RayError, RayServeException) as exc:
        if _caused_by(exc, ImageEncodeError):  # this request's image, not a replica: no retry
            raise APIError(500, "an image of this request could not be encoded", "server_error",
                           code="image_encode_failed") from None
        log.warning("decoder call failed: %s", type(exc).__name__)
        raise _model_unavailable("the model is unavailable (a replica is restarting); retry shortly",
                                 retryable=True) from None


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether `kind` is anywhere in the chain of a Ray error (its `cause`s and `__cause__`s)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


def _model_unavailable(message: str, retryable: bool) -> APIError:
    return APIError(503, message, "server_error", code="model_unavailable", headers={"Retry-After": "5"},
                    retryable=retryable)


def _cancel(stream) -> None:
    """The client left or the call failed: the decoder aborts and frees the KV blocks. Cancelling a
    call that already failed re-raises its error, which must not replace the one being answered."""
    try:
        stream.cancel()
    except Exception:  # noqa: BLE001 - the original error is already on its way to the client
        pass


async def _once(response) -> AsyncIterator:
    yield await response


async def _first(stream: AsyncIterator):
    return await anext(stream)


async def _started(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Wait for a stream's first output, so errors before it still get their own HTTP status."""
    first = await anext(stream)

    async def chained() -> AsyncIterator[RequestOutput]:
        yield first
        async for item in stream:
            yield item

    return chained()


def _raise_for_engine_error(out: RequestOutput) -> None:
    failure = out.failure
    if failure is None:
        return
    if failure.kind == "invalid":
        raise bad_request(failure.message, param="messages")
    if failure.kind == "failed":  # this request alone; the engine and its other requests carry on
        raise APIError(500, failure.message, "server_error", code="request_failed")
    raise _model_unavailable("the model is restarting; retry shortly", failure.retryable)


class ServedModel:
    """One model behind the ingress: its config, tokenizer and image geometry, and its two pools."""

    def __init__(self, cfg: AppConfig, vision: DeploymentHandle, decoder: DeploymentHandle) -> None:
        self.cfg, self.vision, self.decoder = cfg, vision, decoder
        self.tokenizer = ChatTokenizer(find_tokenizer_file(cfg.model, cfg.tokenizer))
        self._token_texts: dict[int, str] = {}  # token id -> its text, for logprobs
        args = load_model_args(cfg.model, cfg.tokenizer).vision_encoder
        self.geometry = ImageGeometry(args.patch_size, args.max_image_size,
                                      args.spatial_merge_size if args.uses_patch_merger else 1)
        self.tags = {"model": cfg.served_model_name}
        self._decoder_info: dict | None = None
        self._info_lock = asyncio.Lock()

    async def info(self) -> dict:
        """The decoder's limits (max_model_len), asked once: concurrent first requests share the call."""
        if self._decoder_info is None:
            async with self._info_lock:
                if self._decoder_info is None:
                    self._decoder_info = await _first(_unavailable_as_503(_once(self.decoder.info.remote())))
        return self._decoder_info

    def logprobs(self, out: RequestOutput) -> list[dict]:
        entries = []
        for lp in out.logprobs:
            entries.append({**self._token_entry(lp.token, lp.logprob),
                            "top_logprobs": [self._token_entry(t, v) for t, v in lp.top]})
        return entries

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self._token_texts.get(token)
        if text is None:  # decoded once per token id: the vocabulary bounds this cache
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def starts_tool_call(self, body: ChatCompletionRequest, out: RequestOutput) -> bool:
        """This output carries [TOOL_CALLS]: the model starts its calls (with tools offered). Its
        text is content; the decoder never merges later tokens into it (`stream_boundaries`)."""
        return not self.stream_boundaries(body).isdisjoint(out.token_ids)

    def stream_boundaries(self, body: ChatCompletionRequest) -> frozenset[int]:
        """[TOOL_CALLS] when tools are offered: where a choice's content ends and its calls begin."""
        token = self.tokenizer.tool_calls_token
        return frozenset([token]) if body.tool_mode not in (None, "none") and token is not None else frozenset()


@serve.deployment(name="OpenAIIngress")
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, configs: list[dict], *pools: DeploymentHandle) -> None:
        """`configs`: one per served model; `pools`: each model's vision pool and decoder, in turn."""
        setup_logging()
        self.models = [ServedModel(AppConfig.from_dict(c), pools[2 * k], pools[2 * k + 1])
                       for k, c in enumerate(configs)]
        self.by_name = {name: m for m in self.models for name in m.cfg.model_names}
        # the app-wide settings (api_keys, max_body_bytes, ingress) are the same in every config
        self.cfg = self.models[0].cfg
        self.tags = {"model": os.environ.get(MODEL_NAME_ENV, "")}  # this replica's own metrics
        self.readiness = Readiness(serve.get_replica_context().app_name,
                                   {m.cfg.served_model_name: [m.vision.deployment_name, m.decoder.deployment_name]
                                    for m in self.models})
        self.mailbox = Mailbox()  # where decoder replicas send this replica's streams (direct_streams)
        self.loop_lag = LoopLagMonitor(lambda lag: metric("pixtral_event_loop_lag_seconds").observe(lag, tags=self.tags))
        start_heap_trimmer()  # decoded images are the ingress's large transients

    # -- routes -------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        created = int(time.time())
        # every accepted name; `root` says which served model an alias stands for
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "pixtral-serve",
                                            "root": m.cfg.served_model_name}
                                           for m in self.models for name in m.cfg.model_names]}

    @app.get("/health")
    async def health(self, model: str | None = None) -> Response:
        """Readiness: 200 while some served model has a running, healthy replica in its vision pool
        and its decoder (`?model=NAME`: that model), with each model's state in the body.

        Read from Serve's controller (its own health checks of every replica) and cached for a
        second or two, so probes never take a queue slot from real traffic, however many arrive.
        """
        self.loop_lag.ensure_started()
        served = None
        if model is not None:
            served = self.by_name.get(model)
            if served is None:
                return JSONResponse({"status": "unknown model"}, status_code=404)
        ready, reason, models = await self.readiness.get(served.cfg.served_model_name if served else None)
        if not ready:
            return JSONResponse({"status": "unavailable", "reason": reason, "models": models}, status_code=503)
        return JSONResponse({"status": "ok", "models": models})

    @app.get("/health/live")
    async def live(self) -> Response:
        """Liveness: this ingress replica's event loop answers."""
        self.loop_lag.ensure_started()
        return JSONResponse({"status": "ok"})

    def take_event_loop_lag(self) -> float:
        """The worst event-loop lag since the last call, in seconds (for operators and tests)."""
        return self.loop_lag.take_worst()

    @app.post("/v1/chat/token_count")
    async def token_count(self, request: Request) -> dict:
        self._authorize(request)
        body = await self._parse(request)
        m = self._model(body, request)
        max_len = (await m.info())["max_model_len"]
        prompt, images = await self._prompt(m, body, max_len)
        return {"object": "token_count", "model": m.cfg.served_model_name,
                "prompt_tokens": len(prompt.tokens), "image_tokens": prompt.num_image_tokens,
                "text_tokens": len(prompt.tokens) - prompt.num_image_tokens,
                "images": [{"width": i.size[0], "height": i.size[1], "tokens": n}
                           for i, n in zip(images, prompt.image_tokens)],
                "max_model_len": max_len}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        self.loop_lag.ensure_started()
        self._authorize(request)
        body = await self._parse(request)
        m = self._model(body, request)
        max_len = (await m.info())["max_model_len"]
        prompt, images = await self._prompt(m, body, max_len)
        params = self._sampling_params(m, body, len(prompt.tokens), max_len)
        metric("pixtral_images_per_request").observe(len(images), tags=m.tags)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        features = _VisionCalls(m.vision, [img.payload for img in images])
        hashes = [img.content_hash for img in images]
        timing = _Timing(started, len(params), prompt.num_image_tokens)
        boundaries = m.stream_boundaries(body)
        streams = [self._generate(m, f"{completion_id}-{i}", prompt.tokens, params[i], features, hashes, timing,
                                  boundaries)
                   for i in range(len(params))]
        if body.stream:
            streams = list(await asyncio.gather(*(_started(s) for s in streams)))
            return StreamingResponse(self._sse(m, body, completion_id, streams, prompt),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await self._complete(m, body, completion_id, streams, prompt)
        # serializing a large answer (n choices with logprobs) would hold the event loop
        return Response(await asyncio.to_thread(json.dumps, result, ensure_ascii=False),
                        media_type="application/json")

    # -- request handling ---------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.cfg.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        supplied = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare with every key, always, in constant time
        ok = False
        for key in self.cfg.api_keys:
            ok |= hmac.compare_digest(supplied, key.encode())
        if not ok:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")

    async def _parse(self, request: Request) -> ChatCompletionRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.cfg.max_body_bytes:
                raise APIError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="request_too_large")
        return await asyncio.to_thread(parse_request, raw)  # JSON and schema: CPU work

    def _model(self, body: ChatCompletionRequest, request: Request) -> ServedModel:
        """The served model the request names (by served name or alias), else a 404."""
        m = self.by_name.get(body.model)
        if m is None:
            raise APIError(404, f"model {body.model[:100]!r} does not exist; available: {list(self.by_name)}",
                           "invalid_request_error", "model", "model_not_found")
        request.state.model = m.cfg.served_model_name  # the HTTP metrics' label
        return m

    async def _prompt(self, m: ServedModel, body: ChatCompletionRequest,
                      max_len: int) -> tuple[EncodedPrompt, list[PreparedImage]]:
        urls = [p.url for msg in body.messages if isinstance(msg.content, list) for p in msg.content
                if isinstance(p, ImagePart)]
        if len(urls) > m.cfg.images.max_images:
            raise too_many_images(len(urls), m.cfg.images)
        chars = text_chars(body)
        if chars > 2 * m.tokenizer.max_chars_per_token * max_len:  # x2: room for normalisation
            raise bad_request(f"the messages have {chars} characters of text, more than this model's context of "
                              f"{max_len} tokens can hold", param="messages", code="context_length_exceeded")
        images = await load_images(urls, m.cfg.images, m.geometry)
        prompt = await asyncio.to_thread(m.tokenizer.encode, body, images)
        return prompt, images

    @staticmethod
    def _sampling_params(m: ServedModel, body: ChatCompletionRequest, prompt_len: int,
                         max_len: int) -> list[SamplingParams]:
        if prompt_len >= max_len:
            raise bad_request(f"the prompt is {prompt_len} tokens (text and images); this model's maximum context "
                              f"length is {max_len} tokens", param="messages", code="context_length_exceeded")
        asked = body.max_completion_tokens or body.max_tokens
        room = max_len - prompt_len
        if asked is not None and asked > room:
            raise bad_request(f"the prompt is {prompt_len} tokens and max_tokens is {asked}; together they exceed "
                              f"this model's maximum context length of {max_len}", param="max_tokens",
                              code="context_length_exceeded")
        n = body.n or 1
        # each generated token of each choice costs (1 + top_logprobs) logprob entries to build
        per_token = 1 + (body.top_logprobs or 0) if body.logprobs else 0
        budget = m.cfg.max_request_output_tokens // n
        if per_token:
            budget = min(budget, m.cfg.max_request_logprob_entries // (n * per_token))
        if asked is not None and asked > budget:
            raise bad_request(f"n={n} x max_tokens={asked}{f' x (1 + top_logprobs)={per_token}' if per_token else ''} "
                              f"is over this server's output budget per request (max_request_output_tokens "
                              f"{m.cfg.max_request_output_tokens}, max_request_logprob_entries "
                              f"{m.cfg.max_request_logprob_entries}): at most max_tokens={budget} here",
                              param="max_tokens", code="output_budget_exceeded")
        max_tokens = asked or max(min(m.cfg.default_max_tokens, room, budget), 1)
        out = []
        for i in range(n):
            seed = None if body.seed is None else body.seed + i
            try:
                out.append(SamplingParams(
                    max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0), seed=seed,
                    stop=body.stop or [], presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0, logprobs=bool(body.logprobs),
                    top_logprobs=body.top_logprobs or 0, logit_bias=body.token_bias, grammar=body.grammar,
                    grammar_trigger=m.tokenizer.tool_calls_token if body.grammar_starts_at_tool_call else None,
                    banned_token_ids=[m.tokenizer.tool_calls_token] if body.tool_mode == "none" else []))
            except ValueError as exc:
                raise bad_request(str(exc)) from None
        return out

    async def _generate(self, m: ServedModel, request_id: str, tokens: list[int], params: SamplingParams,
                        features: "_VisionCalls", hashes: list[str], timing: "_Timing",
                        boundaries: frozenset[int]) -> AsyncIterator[RequestOutput]:
        """Stream one choice. A replica that dies before the first token is retried on a fresh call
        (the vision pool and the decoder route around it); after that the client gets a 503.
        `boundaries`: tokens the decoder sends at the end of an output (see `starts_tool_call`)."""
        mailbox = await self.mailbox.address() if m.cfg.decoder.direct_streams else None
        last = None
        for attempt in range(RETRIES + 1):
            direct = DirectStream(mailbox, uuid.uuid4().hex) if mailbox is not None else None
            queue = self.mailbox.open(direct.key) if direct is not None else None  # before any frame can come
            request = GenerateRequest(request_id, tokens, params, hashes, boundaries, direct)
            stream = m.decoder.options(stream=True).generate.remote(request, *features.get(attempt))
            outputs = _unavailable_as_503(stream) if direct is None else self._direct(direct, queue, stream, boundaries)
            finished = False
            try:
                async for out in outputs:
                    _raise_for_engine_error(out)
                    now = time.perf_counter()
                    if out.token_ids:
                        if last is None and not timing.first_token_seen:
                            timing.first_token_seen = True
                            metric("pixtral_time_to_first_token_seconds").observe(now - timing.start, tags=m.tags)
                        elif last is not None:  # an output may hold several tokens (the decoder's stream interval)
                            gap = (now - last) / len(out.token_ids)
                            for _ in out.token_ids:
                                metric("pixtral_inter_token_latency_seconds").observe(gap, tags=m.tags)
                        last = now
                    finished = out.finished
                    if finished:
                        self._record_finished(m, out, timing)
                    yield out
                return
            except APIError as exc:
                # only a replica that failed before this request ran is retried: never an error the
                # request caused, nor one after tokens were sent
                if not exc.retryable or last is not None or attempt == RETRIES:
                    raise
                log.warning("retrying %s after a replica failure (attempt %d)", request_id, attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
            finally:
                if not finished:
                    _cancel(stream)
                if direct is not None:
                    await outputs.aclose()  # stops its reader and closes its mailbox queue now

    async def _direct(self, direct: DirectStream, queue: asyncio.Queue, stream,
                      boundaries: frozenset[int]) -> AsyncIterator[RequestOutput]:
        """A direct call's outputs, in order and each once: its Serve messages (the first output, the
        last, and what each repeats) and its mailbox frames, from one queue."""
        async def pump() -> None:
            try:
                async for items in _unavailable_as_503(stream):
                    queue.put_nowait(("serve", items))
                queue.put_nowait(("end", None))
            except Exception as exc:  # noqa: BLE001 - raised where the outputs are read
                queue.put_nowait(("error", exc))

        reader = asyncio.create_task(pump())
        order = Ordered(boundaries)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise payload
                for out in order.take(payload if kind == "serve" else [payload]):
                    yield out
        finally:
            reader.cancel()
            self.mailbox.close(direct.key)

    @staticmethod
    def _record_finished(m: ServedModel, out: RequestOutput, timing: "_Timing") -> None:
        count("pixtral_generation_tokens_total", out.completion_tokens, m.tags)
        timing.open_choices -= 1
        if timing.open_choices == 0:  # the last of the request's n choices
            count("pixtral_prompt_tokens_total", out.prompt_tokens, m.tags)
            count("pixtral_image_tokens_total", timing.image_tokens, m.tags)
            metric("pixtral_request_latency_seconds").observe(time.perf_counter() - timing.start, tags=m.tags)

    # -- response formatting ------------------------------------------------------------------
    def _usage(self, prompt: EncodedPrompt, finals: list[RequestOutput]) -> dict:
        completion = sum(o.completion_tokens for o in finals)
        return {"prompt_tokens": len(prompt.tokens), "completion_tokens": completion,
                "total_tokens": len(prompt.tokens) + completion,
                "prompt_tokens_details": {"cached_tokens": max((o.cached_tokens for o in finals), default=0),
                                          "image_tokens": prompt.num_image_tokens}}

    async def _complete(self, m: ServedModel, body: ChatCompletionRequest, completion_id: str, streams: list,
                        prompt: EncodedPrompt) -> dict:
        async def collect(stream) -> tuple[list[str], list[str] | None, list, RequestOutput]:
            content, calls, logprobs, last = [], None, [], None
            async for out in stream:
                if calls is None and m.starts_tool_call(body, out):
                    content.append(out.text)  # the text before the call ends with this output
                    calls = []
                else:
                    (content if calls is None else calls).append(out.text)
                logprobs += m.logprobs(out) if body.logprobs else []
                last = out
            return content, calls, logprobs, last

        results = await asyncio.gather(*(collect(s) for s in streams))
        choices = []
        for i, (content, calls, lps, last) in enumerate(results):
            message, reason = self._message("".join(content), None if calls is None else "".join(calls),
                                            last.finish_reason)
            choices.append({"index": i, "message": message, "logprobs": {"content": lps} if body.logprobs else None,
                            "finish_reason": reason})
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": self._usage(prompt, [r[3] for r in results])}

    @staticmethod
    def _message(content: str, calls_text: str | None, reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a choice: its text, and the tool calls it made after [TOOL_CALLS]
        (`calls_text`, None if it made none; the call syntax never leaks into content)."""
        if calls_text is None:
            return {"role": "assistant", "content": content}, reason
        message = {"role": "assistant", "content": content or None}
        calls = parse_tool_calls(calls_text)
        if calls is None:  # possible only when cut short before the grammar could finish
            log.info("a tool call that does not parse (finish_reason %s); answered without it", reason)
            return message, reason
        return {**message, "tool_calls": calls}, "tool_calls" if reason == "stop" else reason

    async def _sse(self, m: ServedModel, body: ChatCompletionRequest, completion_id: str, streams: list,
                   prompt: EncodedPrompt) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list, usage: dict | None = None) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": body.model, "choices": choices}
            if body.stream_options and body.stream_options.include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream) -> None:
            try:
                async for out in stream:
                    await queue.put((index, out))
            except BaseException as exc:
                await queue.put((index, exc))
            finally:
                await queue.put((index, None))

        for i in range(len(streams)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        finals: list[RequestOutput] = []
        calls: dict[int, ToolCallStream] = {}  # choice -> its tool calls, read as they stream
        open_streams = len(streams)
        try:
            while open_streams:
                index, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, BaseException):
                    error = item if isinstance(item, APIError) else APIError(503, "generation failed", "server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                if item.finished:
                    finals.append(item)
                delta: dict = {}
                if index in calls:  # inside its calls: OpenAI's tool_calls deltas, never content
                    tool_deltas = calls[index].feed(item.text)
                    if tool_deltas:
                        delta["tool_calls"] = tool_deltas
                else:
                    if item.text:
                        delta["content"] = item.text
                    if m.starts_tool_call(body, item):
                        calls[index] = ToolCallStream()
                reason = item.finish_reason
                if item.finished and index in calls:
                    reason = "tool_calls" if reason == "stop" and calls[index].calls() is not None else reason
                if delta or item.finished or item.logprobs:
                    yield chunk([{"index": index, "delta": delta,
                                  "logprobs": {"content": m.logprobs(item)} if body.logprobs else None,
                                  "finish_reason": reason}])
            if body.stream_options and body.stream_options.include_usage:
                payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": body.model, "choices": [], "usage": self._usage(prompt, finals)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()

