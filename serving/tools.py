"""Tool calling in Pixtral's instruct formats (tokenizers v3 and v7): ids, grammars, parsing.

Both formats put the tools in the prompt ([AVAILABLE_TOOLS]) and have the model answer a call as
the control token [TOOL_CALLS] followed by a JSON list:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]

- Call ids are 9 letters or digits (mistral-common refuses others). OpenAI clients send their own
  ids back (`call_...`), so ids map to 9 characters by hash: the same id maps the same way in the
  assistant's call and in the tool's result.
- `tool_choice: "required"` or a named function is a grammar: the [TOOL_CALLS] token, then calls
  whose arguments match each tool's JSON schema, so they always parse and validate. `"auto"`
  lets the model choose, and its answer is parsed if it starts with [TOOL_CALLS]. `"none"` bans
  that token.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string

MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALPHABET = string.ascii_letters + string.digits


def mistral_call_id(call_id: str) -> str:
    """The 9-character id Mistral's formats need, for any client id (kept when it already is one)."""
    if MISTRAL_ID.match(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:9])


def new_call_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(9))


def tool_call_grammar(tools: list[tuple[str, dict]], parallel: bool) -> str:
    """An llguidance (Lark) grammar for one or more calls of these (name, parameters schema) tools,
    in the [TOOL_CALLS] format; the arguments follow each schema, compact as the format writes them."""
    import llguidance

    calls = []
    for i, (name, schema) in enumerate(tools):
        schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        calls.append(f'call{i}: "{{\\"name\\": \\"{name}\\", \\"arguments\\": " %json {json.dumps(schema)} '
                     f'("," " \\"id\\": \\"" CALL_ID "\\"")? "}}"')
    call = "call: " + " | ".join(f"call{i}" for i in range(len(tools)))
    many = '("," " " call)*' if parallel else ""
    lark = "\n".join([f'start: <TOOL_CALLS> "[" call {many} "]"', call, *calls, "CALL_ID: /[a-zA-Z0-9]{9}/"])
    return llguidance.grammar_from("lark", lark)


def parse_tool_calls(text: str) -> list[dict] | None:
    """OpenAI `tool_calls` from the text after [TOOL_CALLS]; None if it is not a list of calls."""
    try:
        calls = json.loads(text)
    except ValueError:
        return None
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = call.get("id")
        out.append({"id": call_id if isinstance(call_id, str) and MISTRAL_ID.match(call_id) else new_call_id(),
                    "type": "function", "function": {"name": call["name"], "arguments": arguments}})
    return out
