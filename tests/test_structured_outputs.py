"""response_format and logit_bias: grammar-constrained decoding with both Pixtral tokenizers.

Random weights are the strongest test of a grammar: the model has no idea what JSON is, so every
valid output is the grammar's doing. Tekken (12B, v3) and SentencePiece with byte fallback
(Large, v7) each get the same checks.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from model.engine.guided import GrammarError, json_grammar
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from serving.protocol import APIError, parse_request
from tests.helpers import mistral_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}


# nesting, an array of objects, an optional key, strings (with whatever escapes the model picks)
NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "owner": {"type": "object", "properties": {"first": {"type": "string", "maxLength": 8},
                                                   "nick": {"type": "string", "maxLength": 6}},
                  "required": ["first"], "additionalProperties": False},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"enum": ["A1", "B2"]}, "qty": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
    },
    "required": ["id", "owner", "items"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["tekken", "sentencepiece"])
def engine_and_prompt(request, mistral_12b, mistral_large):
    ckpt = mistral_12b if request.param == "tekken" else mistral_large
    engine = build_local_engine(ckpt, num_blocks=256, max_model_len=2048)
    tokenizer = mistral_tokenizer(ckpt)
    prompt = tokenizer.instruct_tokenizer.tokenizer.encode("[INST] Describe a person as JSON [/INST]", bos=True, eos=False)
    return engine, prompt, tokenizer.instruct_tokenizer.tokenizer


def _run(engine, prompt, params: dict[str, SamplingParams]) -> dict[str, tuple[list[int], str, str]]:
    for request_id, p in params.items():
        engine.add_request(request_id, prompt, p)
    results = {rid: ([], [], None) for rid in params}
    for rid, outs in engine.run_to_completion().items():
        tokens = [t for o in outs for t in o.token_ids]
        results[rid] = (tokens, "".join(o.text for o in outs), outs[-1].finish_reason)
    return results


def _replay(engine, grammar: str, tokens: list[int]) -> bool:
    """Every token is one the grammar allowed: a fresh matcher accepts the whole output."""
    matcher = engine.grammars.matcher(grammar)
    return all(matcher.consume_token(t) for t in tokens)


def test_every_schema_output_validates(engine_and_prompt):
    engine, prompt, tokenizer = engine_and_prompt
    grammar = json_grammar(SCHEMA)
    # stop strings apply to free text only: a '"' cannot cut the JSON
    params = {f"s{seed}": SamplingParams(max_tokens=300, temperature=1.0, seed=seed, grammar=grammar,
                                         stop=['"'] if seed % 2 else [])
              for seed in range(6)}
    params["greedy"] = SamplingParams(max_tokens=300, temperature=0.0, grammar=grammar)
    for rid, (tokens, text, reason) in _run(engine, prompt, params).items():
        assert reason == "stop", (rid, reason, text)
        jsonschema.validate(json.loads(text), SCHEMA)
        assert _replay(engine, grammar, tokens), rid
        # no control token inside the output (the last may be EOS, when the grammar ended there)
        body = tokens[:-1] if tokens[-1] == tokenizer.eos_id else tokens
        assert not [t for t in body if t < tokenizer.num_special_tokens], (rid, tokens)


def test_one_batch_of_different_schemas_and_none(engine_and_prompt):
    """Each request of one batch follows its own schema; the unconstrained ones are plain text."""
    engine, prompt, _ = engine_and_prompt
    grammars = {"person": (SCHEMA, json_grammar(SCHEMA)), "order": (NESTED, json_grammar(NESTED))}
    params = {f"{name}{seed}": SamplingParams(max_tokens=300, temperature=0.9, seed=seed, grammar=grammar)
              for name, (_, grammar) in grammars.items() for seed in range(4)}
    params.update({f"free{seed}": SamplingParams(max_tokens=30, temperature=0.9, seed=seed) for seed in range(2)})
    for rid, (tokens, text, reason) in _run(engine, prompt, params).items():
        if rid.startswith("free"):
            continue
        schema, grammar = grammars[rid.rstrip("0123456789")]
        assert reason == "stop", (rid, reason, text)
        jsonschema.validate(json.loads(text), schema)
        assert _replay(engine, grammar, tokens), rid


def test_without_the_grammar_the_same_requests_are_not_json(engine_and_prompt):
    """Guard: the validity above comes from the grammar, not from the random model."""
    engine, prompt, _ = engine_and_prompt
    params = {f"s{seed}": SamplingParams(max_tokens=60, temperature=1.0, seed=seed) for seed in range(6)}
    valid = 0
    for _, text, _ in _run(engine, prompt, params).values():
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid == 0


def test_json_object_outputs_follow_the_grammar(engine_and_prompt):
    engine, prompt, _ = engine_and_prompt
    grammar = json_grammar(None)
    params = {f"o{seed}": SamplingParams(max_tokens=120, temperature=0.7, seed=seed, grammar=grammar)
              for seed in range(4)}
    for rid, (tokens, text, reason) in _run(engine, prompt, params).items():
        assert _replay(engine, grammar, tokens), rid
        assert isinstance(json.loads(text), dict), (reason, text)


@pytest.mark.parametrize("schema", [None, NESTED], ids=["json_object", "nested_schema"])
def test_outputs_cut_by_max_tokens_still_parse(engine_and_prompt, schema):
    """Random weights never close a JSON string by chance; near the end of max_tokens the engine
    forces the shortest way to the end, so every output parses (and validates), with "length"."""
    engine, prompt, _ = engine_and_prompt
    grammar = json_grammar(schema)
    params = {f"m{max_tokens}s{seed}": SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, grammar=grammar)
              for seed in range(6) for max_tokens in (24, 40, 90)}
    reasons = set()
    for rid, (tokens, text, reason) in _run(engine, prompt, params).items():
        assert len(tokens) <= params[rid].max_tokens
        value = json.loads(text)
        assert isinstance(value, dict), (rid, text)
        if schema is not None:
            jsonschema.validate(value, schema)
        assert _replay(engine, grammar, tokens), rid
        reasons.add(reason)
    assert "length" in reasons


def test_the_context_limit_cuts_json_cleanly_too(mistral_12b):
    """The budget is also the room left in the context, not only max_tokens."""
    engine = build_local_engine(mistral_12b, num_blocks=64, max_model_len=96)
    tokenizer = mistral_tokenizer(mistral_12b).instruct_tokenizer.tokenizer
    prompt = tokenizer.encode("[INST] JSON please [/INST]", bos=True, eos=False)
    # random weights close the object at once about half the time ({}): several seeds, so that
    # some run into the limit
    params = {f"s{seed}": SamplingParams(max_tokens=1000, temperature=1.0, seed=seed, grammar=json_grammar(None))
              for seed in range(4)}
    reasons = set()
    for tokens, text, reason in _run(engine, prompt, params).values():
        assert len(prompt) + len(tokens) <= 96 and isinstance(json.loads(text), dict), text
        reasons.add(reason)
    assert "length" in reasons


def test_batch_mates_without_a_grammar_are_untouched(engine_and_prompt):
    engine, prompt, _ = engine_and_prompt
    alone = _run(engine, prompt, {"plain": SamplingParams(max_tokens=12, temperature=0.0)})["plain"]
    together = _run(engine, prompt, {"plain": SamplingParams(max_tokens=12, temperature=0.0),
                                     "json": SamplingParams(max_tokens=40, temperature=0.0, grammar=json_grammar(SCHEMA))})
    assert together["plain"][0] == alone[0]
    assert together["json"][0] != alone[0][:len(together["json"][0])]


def test_logit_bias_bans_and_forces_tokens(engine_and_prompt):
    engine, prompt, _ = engine_and_prompt
    first = _run(engine, prompt, {"a": SamplingParams(max_tokens=1, temperature=0.0)})["a"][0][0]
    banned = _run(engine, prompt, {"b": SamplingParams(max_tokens=1, temperature=0.0, logit_bias={first: -100.0})})
    assert banned["b"][0][0] != first
    forced = _run(engine, prompt, {"c": SamplingParams(max_tokens=3, temperature=1.0, seed=1,
                                                       logit_bias={4242: 100.0})})
    assert forced["c"][0] == [4242] * 3


def test_a_grammar_is_compiled_once(engine_and_prompt):
    engine, _, _ = engine_and_prompt
    grammar = json_grammar({"type": "object", "properties": {"x": {"type": "integer"}}})
    assert engine.grammars.compile(grammar) is engine.grammars.compile(grammar)
    assert engine.grammars.matcher(grammar) is not engine.grammars.matcher(grammar)  # one per request


def _body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_protocol_compiles_schemas_and_names_bad_ones():
    body = parse_request(_body(response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                                                         "strict": True}}))
    assert body.grammar == json_grammar(SCHEMA)
    assert parse_request(_body(response_format={"type": "json_object"})).grammar == json_grammar(None)
    assert parse_request(_body(response_format={"type": "text"})).grammar is None
    with pytest.raises(APIError) as bad:
        parse_request(_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}))
    assert bad.value.status == 400 and bad.value.param == "response_format.json_schema.schema"
    assert "nope" in bad.value.message
    with pytest.raises(APIError, match="needs a json_schema object"):
        parse_request(_body(response_format={"type": "json_schema"}))
    with pytest.raises(GrammarError):
        json_grammar({"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}})


def test_protocol_takes_logit_bias_and_the_fields_sdks_send():
    body = parse_request(_body(logit_bias={"42": 5, "7": -100}, user="u1", store=False, metadata={"k": "v"},
                               safe_prompt=False, random_seed=11, prompt_mode=None, service_tier="auto"))
    assert body.token_bias == {42: 5.0, 7: -100.0} and body.seed == 11
    for bias in ({"x": 1}, {"5": 101}):
        with pytest.raises(APIError):
            parse_request(_body(logit_bias=bias))


def test_vocabulary_bytes_for_both_tokenizers():
    from model.engine.guided import _VocabularyBytes
    from model.tiny import tokenizer_path
    from tests.helpers import inner_tokenizer

    tekken = inner_tokenizer(tokenizer_path("tekken_240911.json"))
    vocab = _VocabularyBytes(tekken, 131072)
    assert vocab.special_token_ids == list(range(1000)) and vocab.tokens[3] == b"<INST>"
    assert b"".join(vocab.tokens[t] for t in tekken.encode("héllo {", bos=False, eos=False)) == "héllo {".encode()

    sp = inner_tokenizer(tokenizer_path("mistral_instruct_tokenizer_241114.model.v7m1"))
    vocab = _VocabularyBytes(sp, 32768)
    newline = sp._model.piece_to_id("<0x0A>")
    assert vocab.tokens[newline] == b"\n"  # byte fallback: the byte itself
    assert vocab.tokens[sp._model.piece_to_id("\u2581hell")] == b" hell"
    assert {0, 1, 2, 3, 5, 10} <= set(vocab.special_token_ids) and vocab.tokens[5] == b"<TOOL_CALLS>"
    # llguidance's tokenize callback: exactly the text, without SentencePiece's leading space
    assert b"".join(vocab.tokens[t] for t in vocab('{"a": "é\n"}')) == '{"a": "é\n"}'.encode()
