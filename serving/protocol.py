"""The OpenAI chat-completions wire format: request validation (pydantic) and error bodies.

Bounds that keep one request from costing more than its share (each refusal is a 400 naming it):
JSON nesting depth and object/array count, messages per request and parts per message, stop
strings (count and length, in model.engine.sampling_params), n, top_logprobs, logit_bias.

Fields OpenAI clients and the mistralai SDK send that have no effect here (user, store, metadata,
service_tier, safe_prompt, prompt_mode, ...) are accepted and ignored, as OpenAI does; the SDK's
random_seed means seed. response_format json_object / json_schema is compiled to a grammar here,
and a schema that cannot be compiled is a 400 naming the problem.
"""

from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from model.engine.guided import GrammarError, json_grammar, llguidance_error
from model.engine.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS
from serving.tools import tool_call_grammar

MAX_JSON_DEPTH = 32  # a chat request needs 6 (body > messages > message > content > part > image_url)
# Parsing holds the GIL for the whole document, and its cost grows with the number of values: a
# body of many tiny objects is refused by counting '{' and '[' first (also those inside strings:
# the bound is loose enough for any real prompt).
MAX_JSON_CONTAINERS = 100_000
MAX_MESSAGES = 4096
MAX_PARTS_PER_MESSAGE = 512
MAX_N = 16
MAX_TOOLS = 128


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON with its HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
                 retryable: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}
        self.retryable = retryable  # the ingress may send it to another replica (never told the client)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = "auto"


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class CalledFunction(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=1 << 20)  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call the assistant made, sent back in the conversation."""
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_PARTS_PER_MESSAGE)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # assistant
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=128)  # tool

    @model_validator(mode="after")
    def _check_content(self) -> "Message":
        empty = self.content is None or self.content == "" or self.content == []
        if empty and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs non-empty content")
        if self.role != "user" and isinstance(self.content, list) and any(
                isinstance(p, ImagePart) for p in self.content):
            raise ValueError(f"images are only accepted in user messages, not in {self.role} messages")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


class FunctionSpec(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: dict[str, str]  # {"name": ...}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaSpec(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    # Honoured either way: the output is always constrained to the schema (OpenAI constrains only
    # with strict: true, and then refuses schemas outside its subset; we take any schema llguidance
    # compiles).
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    random_seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # the mistralai SDK's name for seed
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    tools: Annotated[list[ToolSpec], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required", "any"] | NamedToolChoice | None = None  # "any": Mistral's "required"
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    # the llguidance grammar of response_format and tool calls, compiled while parsing (off the event loop)
    _grammar: str | None = PrivateAttr(default=None)

    @property
    def grammar(self) -> str | None:
        return self._grammar

    @property
    def grammar_starts_at_tool_call(self) -> bool:
        """tool_choice "auto" with a text answer: the output is free until the model starts a call
        ([TOOL_CALLS]), and the call grammar applies from there."""
        return self.tool_mode == "auto" and (self.response_format is None or self.response_format.type == "text")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key[:20]!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value}")
        return v

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
                             "characters")
        return stops

    @property
    def tool_mode(self) -> str | None:
        """None (no tools), "auto", "none", "required", or the name of the function it must call."""
        if not self.tools:
            return None
        choice = self.tool_choice or "auto"
        if choice == "any":
            return "required"
        return choice if isinstance(choice, str) else choice.function.get("name", "")

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice not in (None, "auto", "none") and not names:
            raise ValueError("tool_choice requires tools")
        if self.tool_mode not in (None, "auto", "none", "required") and self.tool_mode not in names:
            raise ValueError(f"tool_choice names {self.tool_mode[:64]!r}, which is not among the tools {names[:10]}")
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if self.tool_mode not in (None, "auto", "none") and self.response_format and self.response_format.type != "text":
            raise ValueError("a tool call is JSON already: response_format cannot be combined with a required "
                             "or named tool_choice")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic errors -> (one readable message, the offending parameter path)."""
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    msg = first.get("msg", "invalid request").removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def parse_request(raw: bytes | bytearray) -> ChatCompletionRequest:
    """Body bytes -> a validated request, or an APIError (400) naming what is wrong.

    CPU work proportional to the body: the ingress runs it off the event loop.
    """
    containers = raw.count(b"{") + raw.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise bad_request(f"the request body has {containers} JSON objects and arrays; at most "
                          f"{MAX_JSON_CONTAINERS} are accepted", code="invalid_json")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    if json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise _too_deep()
    try:
        body = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise bad_request(message, param=param) from None
    if body.seed is None and body.random_seed is not None:
        body.seed = body.random_seed
    fmt = body.response_format
    json_answer = fmt is not None and fmt.type != "text"
    schema = fmt.json_schema.schema_ if json_answer and fmt.type == "json_schema" else None
    if json_answer:
        try:
            # keys keep their order: the output's properties come in the order the schema lists them
            body._grammar = _json_grammar(json.dumps(schema) if schema is not None else None)
        except GrammarError as exc:
            raise bad_request(f"response_format.json_schema.schema cannot be used: {exc}",
                              param="response_format.json_schema.schema", code="invalid_schema") from None
    mode = body.tool_mode
    if mode not in (None, "none"):
        chosen = [t.function for t in body.tools if mode in ("auto", "required", t.function.name)]
        # "auto" with a JSON response_format: the answer is a call or that JSON, one grammar
        or_json = json.dumps(schema if json_answer and mode == "auto" else False)
        try:
            body._grammar = _tool_grammar(json.dumps([(f.name, f.parameters) for f in chosen]),
                                          body.parallel_tool_calls is not False and mode in ("auto", "required"),
                                          or_json)
        except (GrammarError, ValueError) as exc:
            raise bad_request(f"the tools' parameters cannot be used as a grammar: {exc}", param="tools",
                              code="invalid_schema") from None
    return body


@functools.lru_cache(maxsize=256)
def _tool_grammar(tools_json: str, parallel: bool, or_json: str) -> str:
    grammar = tool_call_grammar([tuple(t) for t in json.loads(tools_json)], parallel, json.loads(or_json))
    error = llguidance_error(grammar)
    if error:
        raise GrammarError(error)
    return grammar


@functools.lru_cache(maxsize=256)
def _json_grammar(schema_json: str | None) -> str:
    """Compiled once per distinct schema (keyed by its JSON text)."""
    return json_grammar(json.loads(schema_json) if schema_json is not None else None)


def _too_deep() -> APIError:
    return bad_request(f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, counting stops once it passes `limit` (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
