"""Tool calling in Pixtral's instruct formats (tokenizers v3 and v7): ids, grammars, parsing.

Both formats put the tools in the prompt ([AVAILABLE_TOOLS]) and have the model answer a call as
the control token [TOOL_CALLS] followed by a JSON list:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]

- Call ids are 9 letters or digits (mistral-common refuses others). OpenAI clients send their own
  ids back (`call_...`), so ids map to 9 characters by hash: the same id maps the same way in the
  assistant's call and in the tool's result. Ids of the calls we answer are ours, fresh and already
  in that form (a streamed call needs its id before the model would write one, after the arguments).
- Every call is grammar-constrained, so its arguments always parse and validate:
  - `tool_choice: "required"` or a named function: the answer must be the [TOOL_CALLS] token
    and then calls of the allowed tools, each call's arguments matching the tool's JSON schema;
  - `"auto"`: the model writes free text, and the same grammar starts when it samples
    [TOOL_CALLS] (the engine's `grammar_trigger`). With a JSON response_format, the answer is one
    grammar: a call or the JSON;
  - `"none"` bans [TOOL_CALLS].
- `ToolCallStream` reads the call list as it streams and says what OpenAI's deltas say: each
  call's id and name first, then its arguments in fragments. A non-streamed answer is read by the
  same parser, so both give the same calls, byte for byte.
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


def tool_call_grammar(tools: list[tuple[str, dict]], parallel: bool, or_json: dict | None | bool = False) -> str:
    """An llguidance (Lark) grammar for one or more calls of these (name, parameters schema) tools,
    in the [TOOL_CALLS] format; the arguments follow each schema, compact as the format writes them.

    `or_json`: also allow, instead of calls, JSON matching this schema (None: any JSON object) - for
    tool_choice "auto" with a JSON response_format. False: calls only."""
    import llguidance

    compact = {"x-guidance": {"whitespace_flexible": False}}
    calls = []
    for i, (name, schema) in enumerate(tools):
        calls.append(f'call{i}: "{{\\"name\\": \\"{name}\\", \\"arguments\\": " %json {json.dumps({**schema, **compact})} '
                     f'("," " \\"id\\": \\"" CALL_ID "\\"")? "}}"')
    many = '("," " " call)*' if parallel else ""
    start = f'start: <TOOL_CALLS> "[" call {many} "]"'
    if or_json is not False:
        answer = or_json if or_json is not None else {"type": "object"}
        start += f" | %json {json.dumps({**answer, **compact})}"
    lark = "\n".join([start, "call: " + " | ".join(f"call{i}" for i in range(len(tools))), *calls,
                      "CALL_ID: /[a-zA-Z0-9]{9}/"])
    return llguidance.grammar_from("lark", lark)


class ToolCallStream:
    """Reads the JSON list after [TOOL_CALLS] as it arrives, character by character.

    `feed(text)` returns OpenAI `tool_calls` deltas: `{"index", "id", "type", "function": {"name",
    "arguments": ""}}` once a call's name is complete, then `{"index", "function": {"arguments":
    fragment}}` as its arguments come. The arguments are the model's own text of the JSON value.
    `calls()` gives the complete calls at the end, or None if the text is not a list of calls
    (cut short, or not the format).
    """

    def __init__(self) -> None:
        self._state = "start"
        self._calls: list[dict] = []
        self._call: dict | None = None  # the call being read: name, arguments text, whether announced
        self._key = ""  # the member being read
        self._value = ""  # its raw JSON text so far
        self._depth = 0  # containers open inside the value
        self._in_string = False
        self._escaped = False
        self._listed = True  # the calls are in a list (else one bare object is the whole answer)
        self._done = False
        self.failed = False

    def feed(self, text: str) -> list[dict]:
        deltas: list[dict] = []
        for ch in text:
            if self.failed:
                break
            if self._done:  # only blanks may follow the answer
                self.failed = not ch.isspace()
                continue
            self._step(ch, deltas)
        return self._merged(deltas)

    def calls(self) -> list[dict] | None:
        if self.failed or not self._done or not self._calls:
            return None
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self._calls]

    # -- the scanner ---------------------------------------------------------------------------
    def _step(self, ch: str, deltas: list[dict]) -> None:
        state = self._state
        if state == "value":
            self._value_char(ch, deltas)
        elif state == "key":
            self._string_char(ch)
            if not self._in_string:
                self._key = json.loads(self._value)
                self._state = "colon"
        elif ch.isspace():
            return
        elif state == "start" and ch == "[":
            self._state = "call"
        elif state in ("start", "call") and ch == "{":  # a bare object is one call
            self._listed = state == "call"
            self._call = {"id": new_call_id(), "name": None, "arguments": None, "pending": ""}
            self._calls.append(self._call)
            self._state = "member"
        elif state == "call" and ch == "," and self._calls:
            pass
        elif state == "call" and ch == "]" and self._calls:
            self._done = True
        elif state == "member" and ch == '"':
            self._value, self._in_string, self._state = '"', True, "key"
        elif state == "member" and ch == ",":
            pass
        elif state == "member" and ch == "}":
            if self._call["name"] is None:
                self.failed = True
                return
            if self._call["arguments"] is None:
                self._call["arguments"] = "{}"
                deltas.append({"index": len(self._calls) - 1, "function": {"arguments": "{}"}})
            self._state = "call"
            self._done = not self._listed
        elif state == "colon" and ch == ":":
            self._value, self._depth, self._state = "", 0, "value"
        else:
            self.failed = True

    def _string_char(self, ch: str) -> None:
        self._value += ch
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False

    def _value_char(self, ch: str, deltas: list[dict]) -> None:
        if not self._value and ch.isspace():
            return
        if self._in_string:
            self._string_char(ch)
            complete = not self._in_string and self._depth == 0
        elif ch in ",}" and self._depth == 0:  # a number, true, false or null ends before this
            self._finish_member(deltas)
            self._state = "member"
            self._step(ch, deltas)
            return
        else:
            self._value += ch
            if ch == '"':
                self._in_string = True
            elif ch in "[{":
                self._depth += 1
            elif ch in "]}":
                self._depth -= 1
            complete = self._depth == 0 and ch in "]}"
        if self._key == "arguments" and not self._value.startswith('"'):
            self._call["pending"] += ch  # streamed as it comes (a string value is decoded at its end)
            self._announce(deltas)
        if complete:
            self._finish_member(deltas)
            self._state = "member"

    def _finish_member(self, deltas: list[dict]) -> None:
        try:
            value = json.loads(self._value)
        except ValueError:
            self.failed = True
            return
        call = self._call
        if self._key == "name":
            if not isinstance(value, str) or call["name"] is not None:
                self.failed = True
                return
            call["name"] = value
            self._announce(deltas)
        elif self._key == "arguments":
            if not isinstance(value, (dict, str)):
                self.failed = True
                return
            if isinstance(value, str):  # arguments written as a JSON string: the string is the JSON
                call["pending"] = value
                self._announce(deltas)
            call["arguments"] = self._value if not isinstance(value, str) else value

    def _announce(self, deltas: list[dict]) -> None:
        """Send the call's header once its name is known, then whatever arguments text is pending."""
        call = self._call
        if call["name"] is None:
            return
        index = len(self._calls) - 1
        if not call.get("announced"):
            call["announced"] = True
            deltas.append({"index": index, "id": call["id"], "type": "function",
                           "function": {"name": call["name"], "arguments": ""}})
        if call["pending"]:
            deltas.append({"index": index, "function": {"arguments": call["pending"]}})
            call["pending"] = ""

    @staticmethod
    def _merged(deltas: list[dict]) -> list[dict]:
        """One delta per call and kind per feed: consecutive argument fragments of a call joined."""
        out: list[dict] = []
        for d in deltas:
            last = out[-1] if out else None
            if (last is not None and last["index"] == d["index"] and "id" not in d
                    and set(last["function"]) <= {"name", "arguments"}):
                last["function"]["arguments"] += d["function"]["arguments"]
            else:
                out.append({**d, "function": dict(d["function"])})
        return out


def parse_tool_calls(text: str) -> list[dict] | None:
    """OpenAI `tool_calls` from the whole text after [TOOL_CALLS]; None if it is not a list of calls."""
    stream = ToolCallStream()
    stream.feed(text)
    return stream.calls()
