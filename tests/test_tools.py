"""Tool calling with both Pixtral tokenizers: prompts, ids, grammars for required and named
choices, "none", and the parsing of [TOOL_CALLS] answers. Random weights: every valid call is the
grammar's doing."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from serving.protocol import APIError, parse_request
from serving.tokenization import ChatTokenizer
from serving.tools import MISTRAL_ID, ToolCallStream, mistral_call_id, parse_tool_calls
from tests.helpers import mistral_tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}


def request(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, **fields}
    return parse_request(json.dumps(body).encode())


@pytest.fixture(scope="module", params=["tekken", "sentencepiece"])
def setup(request, mistral_12b, mistral_large):
    ckpt = mistral_12b if request.param == "tekken" else mistral_large
    return ckpt, build_local_engine(ckpt, num_blocks=256, max_model_len=2048), ChatTokenizer(
        next(p for p in ckpt.iterdir() if p.name.startswith(("tekken", "tokenizer.model"))))


def _generate(engine, tokens, params: dict[str, SamplingParams]) -> dict:
    for rid, p in params.items():
        engine.add_request(rid, tokens, p)
    return {rid: ([t for o in outs for t in o.token_ids], "".join(o.text for o in outs), outs[-1].finish_reason)
            for rid, outs in engine.run_to_completion().items()}


def test_call_ids_map_to_mistral_ids():
    assert mistral_call_id("abcDEF123") == "abcDEF123"
    mapped = mistral_call_id("call_9f8e7d6c5b4a")
    assert MISTRAL_ID.match(mapped) and mapped == mistral_call_id("call_9f8e7d6c5b4a") != mistral_call_id("call_2")


ANSWER = (' [{"name": "add", "arguments": {"a": 1, "b": [2, "x}\\"y"]}, "id": "abcDEF123"}, {"name": "f"}, '
          '{"arguments": {"q": true}, "name": "g"}]')


def test_parse_tool_calls():
    calls = parse_tool_calls(ANSWER)
    # the arguments are the model's own text of the value; the ids are the server's, fresh
    assert [c["function"] for c in calls] == [{"name": "add", "arguments": '{"a": 1, "b": [2, "x}\\"y"]}'},
                                              {"name": "f", "arguments": "{}"}, {"name": "g", "arguments": '{"q": true}'}]
    assert all(MISTRAL_ID.match(c["id"]) and c["type"] == "function" for c in calls)
    assert parse_tool_calls('{"name": "f", "arguments": "{\\"k\\": 1}"}')[0]["function"]["arguments"] == '{"k": 1}'
    for bad in ('[{"name": "add", "arguments": {"a": 1', "[]", '[{"arguments": {}}]', "hello", '[{"name": 3}]',
                '[{"name": "f", "arguments": 12}]', '[{"name": "f"}] and more'):
        assert parse_tool_calls(bad) is None, bad


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_streamed_calls_come_as_openai_deltas(size):
    """Streamed in pieces of any size: each call's id and name first, then its arguments in
    fragments; accumulated as OpenAI clients do, they give the non-streamed calls."""
    stream = ToolCallStream()
    deltas = [d for i in range(0, len(ANSWER), size) for d in stream.feed(ANSWER[i:i + size])]
    calls = stream.calls()
    assert [c["function"] for c in calls] == [c["function"] for c in parse_tool_calls(ANSWER)]
    rebuilt: dict[int, dict] = {}
    for d in deltas:
        if "id" in d:  # the first delta of a call names it
            assert d["index"] not in rebuilt and d["type"] == "function"
            rebuilt[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
        else:
            assert set(d["function"]) == {"arguments"}
        rebuilt[d["index"]]["arguments"] += d["function"]["arguments"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [(r["id"], r["name"], r["arguments"]) for r in rebuilt.values()]
    if size == 1:
        assert sum(1 for d in deltas if d["index"] == 0) > 3  # arguments in fragments, not whole


def test_prompt_with_calls_and_results_is_mistral_commons(setup):
    """Tools, an assistant's calls (OpenAI ids) and the tool's result encode as mistral-common
    encodes them with the mapped ids."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    ckpt, _, chat = setup
    body = request(messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21}'},
        {"role": "user", "content": "And in F?"}])
    ours = chat.encode(body, []).tokens
    mapped = mistral_call_id("call_abc")
    reference = mistral_tokenizer(ckpt).encode_chat_completion(ChatCompletionRequest(
        tools=[Tool(function=Function(name="get_weather", description="Weather now", parameters=WEATHER)),
               Tool(function=Function(name="add", description="", parameters=ADD))],
        messages=[UserMessage(content="Weather in Paris?"),
                  AssistantMessage(tool_calls=[ToolCall(id=mapped, function=FunctionCall(
                      name="get_weather", arguments='{"city": "Paris", "unit": "C"}'))]),
                  ToolMessage(content='{"temperature": 21}', tool_call_id=mapped),
                  UserMessage(content="And in F?")])).tokens
    assert ours == reference


@pytest.mark.parametrize("choice, parallel", [("required", True), ("required", False),
                                              ({"type": "function", "function": {"name": "add"}}, True)])
def test_required_and_named_calls_always_parse_and_validate(setup, choice, parallel):
    _, engine, chat = setup
    body = request(tool_choice=choice, parallel_tool_calls=parallel)
    tokens = chat.encode(body, []).tokens
    # random weights may keep adding parallel calls until max_tokens: near its end the engine
    # closes the list, so even those answers parse
    params = {f"m{max_tokens}s{seed}": SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed,
                                                      grammar=body.grammar)
              for seed in range(5) for max_tokens in (50, 200)}
    results = _generate(engine, tokens, params)
    assert any(reason == "stop" for _, _, reason in results.values())
    for rid, (out, text, reason) in results.items():
        assert out[0] == chat.tool_calls_token, (rid, text)
        matcher = engine.grammars.matcher(body.grammar)
        assert all(matcher.consume_token(t) for t in out), (rid, text)
        assert reason in ("stop", "length"), (rid, reason, text)
        calls = parse_tool_calls(text)
        assert calls, (rid, text)
        assert parallel or len(calls) == 1
        for call in calls:
            name = call["function"]["name"]
            assert name in (SCHEMAS if choice == "required" else {"add"}), name
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def test_none_never_calls(setup):
    _, engine, chat = setup
    body = request(tool_choice="none")
    tokens = chat.encode(body, []).tokens
    # even a +100 bias on [TOOL_CALLS] cannot bring it back
    params = SamplingParams(max_tokens=5, temperature=0.0, logit_bias={chat.tool_calls_token: 100.0},
                            banned_token_ids=[chat.tool_calls_token])
    out, _, _ = _generate(engine, tokens, {"n": params})["n"]
    assert chat.tool_calls_token not in out
    forced = _generate(engine, tokens, {"f": SamplingParams(max_tokens=1, temperature=0.0,
                                                             logit_bias={chat.tool_calls_token: 100.0})})["f"]
    assert forced[0] == [chat.tool_calls_token]  # the same bias without the ban does call


def test_tool_requests_are_checked():
    for fields, message in [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tool_choice": "required", "tools": None}, "tool_choice requires tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined"),
        ({"tools": TOOLS + TOOLS[:1]}, "unique"),
        ({"messages": [{"role": "tool", "content": "1"}]}, "tool_call_id"),
    ]:
        with pytest.raises(APIError, match=message):
            request(**fields)
    auto = request()
    assert auto.tool_mode == "auto" and auto.grammar is not None and auto.grammar_starts_at_tool_call
    # with a JSON answer asked for, "auto" is one grammar from the start: a call or that JSON
    assert not request(response_format={"type": "json_object"}).grammar_starts_at_tool_call
    assert request(tool_choice="none").grammar is None


def test_auto_calls_parse_wherever_the_model_starts_them(setup):
    """tool_choice "auto": free text until the model samples [TOOL_CALLS], the call grammar from
    there. A bias makes random weights call at various points; every call parses and validates,
    whatever stop strings say (they apply to the text only), and a call that could not finish in
    the budget never starts."""
    _, engine, chat = setup
    body = request()
    tokens = chat.encode(body, []).tokens
    trigger = chat.tool_calls_token
    params = {f"m{max_tokens}s{seed}": SamplingParams(
        max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=body.grammar, grammar_trigger=trigger,
        logit_bias={trigger: 9.0}, stop=["}"]) for seed in range(8) for max_tokens in (12, 60)}
    results = _generate(engine, tokens, params)
    starts = []
    for rid, (out, text, reason) in results.items():
        if trigger not in out:
            continue
        at = out.index(trigger)
        starts.append(at)
        matcher = engine.grammars.matcher(body.grammar)
        assert all(matcher.consume_token(t) for t in out[at:]), (rid, text)
        calls = parse_tool_calls(chat.decode(out[at + 1:]))
        assert calls, (rid, reason, text)
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
    assert len(starts) >= 3 and max(starts) > 0, starts  # calls at the start and after some text
    # 12 tokens leave no room for a whole call: [TOOL_CALLS] is banned there
    assert not any(trigger in out for rid, (out, _, _) in results.items() if rid.startswith("m12s"))
