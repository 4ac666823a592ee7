"""The running application, called with the official `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest
from PIL import Image

from model import load_model
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from tests.helpers import deploy_test_app, encode_chat, image_features, random_image, wait_healthy

MODEL = "pixtral-test"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=120)


def png_url(img: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(img: Image.Image, fmt: str = "PNG") -> dict:
    return {"type": "image_url", "image_url": {"url": png_url(img, fmt)}}


def test_chat_with_image_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image_part(random_image(40, 30, 1))]}])
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.choices[0].message.content
    details = r.usage.prompt_tokens_details.model_dump()
    assert details["image_tokens"] == (3 + 1) * 2  # 40x30 -> 3x2 patches, a break/end per row


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, messages=[
        {"role": "user", "content": [image_part(random_image(64, 64, 2), "JPEG"), {"type": "text", "text": "hi"}]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    blocking = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": [image_part(random_image(64, 64, 2), "JPEG"), {"type": "text", "text": "hi"}]}])
    assert text == blocking.choices[0].message.content


def test_seed_request_shapes(client):
    """The seeds' shapes: two images interleaved with text, top_p/temperature, stream false, system prompt."""
    r = client.chat.completions.create(model="pixtral-12b-2409", temperature=0.7, top_p=0.9, stream=False,
                                       max_tokens=5, seed=3, messages=[
        {"role": "system", "content": "You are a careful visual assistant."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"}, image_part(random_image(50, 50, 3), "WEBP"),
            {"type": "text", "text": "with"}, {"type": "image_url", "image_url": png_url(random_image(20, 90, 4))}]}])
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 5


def test_n_choices_with_seed(client):
    r = client.chat.completions.create(model=MODEL, n=2, seed=11, temperature=1.0, max_tokens=4,
                                       messages=[{"role": "user", "content": "two answers"}])
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == sum(4 for _ in r.choices)
    again = client.chat.completions.create(model=MODEL, n=2, seed=11, temperature=1.0, max_tokens=4,
                                           messages=[{"role": "user", "content": "two answers"}])
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_http_greedy_equals_engine(client, mistral_12b):
    img = random_image(70, 40, 5)
    r = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, logprobs=True, messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Describe"}, image_part(img)]}])
    tokens, pixels = encode_chat(mistral_12b, ["Describe", img], system="Be brief.")
    model = load_model(mistral_12b)
    engine = build_local_engine(mistral_12b, model=model, num_blocks=128)
    engine.add_request("direct", tokens, SamplingParams(max_tokens=10, temperature=0.0), image_features(model, pixels))
    direct = engine.run_to_completion()["direct"]
    assert r.choices[0].message.content == "".join(o.text for o in direct)
    assert r.usage.prompt_tokens == len(tokens)
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in direct)
    assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens


def test_models_health_and_token_count(served, client):
    assert {m.id for m in client.models.list().data} == {MODEL, "pixtral-12b-2409"}
    assert httpx.get(f"{served}/health").json() == {"status": "ok", "models": {MODEL: "ok"}}
    assert httpx.get(f"{served}/health", params={"model": "pixtral-12b-2409"}).status_code == 200  # an alias
    assert httpx.get(f"{served}/health", params={"model": "nope"}).status_code == 404
    body = {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "count me"}, image_part(random_image(100, 40, 6))]}]}
    count = httpx.post(f"{served}/v1/chat/token_count", json=body).json()
    assert count["images"] == [{"width": 100, "height": 40, "tokens": (7 + 1) * 3}]
    r = client.chat.completions.create(max_tokens=1, **body)
    assert r.usage.prompt_tokens == count["prompt_tokens"]
    # tool definitions are prompt tokens like any other; a response_format adds none (the schema
    # is enforced by the grammar, not written into the prompt), and the count says exactly that
    tooled = {**body, "tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}}
    with_tools = httpx.post(f"{served}/v1/chat/token_count", json=tooled).json()
    assert with_tools["prompt_tokens"] > count["prompt_tokens"]
    r = client.chat.completions.create(max_tokens=1, **tooled)
    assert r.usage.prompt_tokens == with_tools["prompt_tokens"]


def gif_animated() -> str:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()


def truncated_png() -> str:
    buf = io.BytesIO()
    random_image(64, 64, 7).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()[:200]).decode()


def user_image(url: str) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]}


SVG = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
PDF = "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF").decode()

def bomb_png() -> str:
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")  # ~400M pixels in a few hundred KB
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


REFUSALS = [
    ("bad json", b"{not json", 400),
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("unknown role", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("empty messages", {"model": MODEL, "messages": []}, 400),
    ("wrong type", {"model": MODEL, "messages": "hi"}, 400),
    ("temperature", {"model": MODEL, "temperature": 5, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("bad base64", user_image("data:image/png;base64,@@@notbase64"), 400),
    ("svg", user_image(SVG), 400),
    ("pdf", user_image(PDF), 400),
    ("animated gif", user_image(gif_animated()), 400),
    ("truncated png", user_image(truncated_png()), 400),
    ("decompression bomb", user_image(bomb_png()), 400),
    ("oversized body", {"model": MODEL, "messages": [{"role": "user", "content": "x" * (9 << 20)}]}, 413),
    ("top_p", {"model": MODEL, "top_p": 0, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("top_logprobs", {"model": MODEL, "logprobs": True, "top_logprobs": 21,
                      "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("presence_penalty", {"model": MODEL, "presence_penalty": 2.5, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("n", {"model": MODEL, "n": 0, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("loopback url", user_image("http://127.0.0.1:1/x.png"), 400),
    ("metadata url", user_image("http://169.254.169.254/latest/meta-data"), 400),
    ("file url", user_image("file:///etc/passwd"), 400),
    ("13 images", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url(random_image(4, 4, 8))}}] * 13}]}, 413),
    ("too long", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 12000}]}, 400),
    ("max_tokens too big", {"model": MODEL, "max_tokens": 11000, "messages": [{"role": "user", "content": "hi"}]}, 400),
]


@pytest.mark.parametrize("name, body, status", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_openai_errors(served, name, body, status):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{served}/v1/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_json_schema_over_http(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    ask = dict(model=MODEL, max_tokens=120, temperature=0, response_format=fmt,
               messages=[{"role": "user", "content": "A person, as JSON."}])
    r = client.chat.completions.create(**ask)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, stream=True)
                       if c.choices)
    assert streamed == r.choices[0].message.content
    # any JSON object; a user field and the mistralai SDK's random_seed are accepted
    obj = client.chat.completions.create(model=MODEL, max_tokens=60, temperature=0, user="u-1",
                                         response_format={"type": "json_object"}, extra_body={"random_seed": 3},
                                         messages=[{"role": "user", "content": "JSON please"}])
    assert obj.choices[0].message.content.lstrip().startswith("{")
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    assert bad.value.body["param"] == "response_format.json_schema.schema" and "nope" in bad.value.body["message"]


def test_structured_output_with_an_image_and_the_clients_parse(client):
    """json_schema next to an image; and the openai client's own `parse` with a pydantic model
    (it sends a strict schema and parses the answer into the model)."""
    from typing import Literal

    import jsonschema
    from pydantic import BaseModel, Field

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(model=MODEL, max_tokens=120, temperature=0.8, seed=5, response_format=fmt,
                                       messages=[{"role": "user", "content": [
                                           {"type": "text", "text": "Who is this?"},
                                           {"type": "image_url", "image_url": {"url": png_url(random_image(48, 40, 3))}}]}])
    assert r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens_details.image_tokens > 0
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)

    class Verdict(BaseModel):
        ok: bool
        colour: Literal["red", "green", "blue"]
        score: int = Field(ge=0, le=9)

    parsed = client.chat.completions.parse(model=MODEL, max_tokens=60, temperature=0.8, seed=2, response_format=Verdict,
                                           messages=[{"role": "user", "content": "Judge it."}])
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}}


def test_required_tool_call_over_http(client):
    ask = dict(model=MODEL, max_tokens=80, temperature=0, tools=[WEATHER_TOOL], tool_choice="required",
               parallel_tool_calls=False,
               messages=[{"role": "user", "content": "Weather in Paris?"}])
    r = client.chat.completions.create(**ask)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    # streamed as OpenAI does: the call's id and name first, then its arguments as they come (how
    # many fragments depends on the decoder's stream interval and the machine's speed; the
    # fragmenting itself is tests/test_tools.py's), and no tool-call syntax in any content delta
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed[0].id and streamed[0].function.name == "get_weather"
    assert all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in streamed[1:])
    assert "".join(tc.function.arguments or "" for tc in streamed) == call.function.arguments
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the client's own stream accumulation rebuilds the same call
    with client.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion()
    rebuilt = final.choices[0].message.tool_calls[0]
    assert (rebuilt.function.name, rebuilt.function.arguments) == (call.function.name, call.function.arguments)
    # the conversation goes on with the tool's result, under the id the server gave
    follow = client.chat.completions.create(model=MODEL, max_tokens=4, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}])
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_auto_tool_call_after_text_over_http(client, mistral_12b):
    """tool_choice "auto": the model's text comes as content, then its call as tool_calls, the same
    streamed and not (a bias on [TOOL_CALLS] makes the random model call)."""
    from serving.tokenization import ChatTokenizer

    trigger = ChatTokenizer(next(mistral_12b.glob("tekken*.json"))).tool_calls_token
    for seed in range(12):
        ask = dict(model=MODEL, max_tokens=60, temperature=1.0, seed=seed, tools=[WEATHER_TOOL],
                   parallel_tool_calls=False, logit_bias={str(trigger): 9},
                   messages=[{"role": "user", "content": "Weather in Paris?"}])
        r = client.chat.completions.create(**ask)
        # (a call that max_tokens cuts is closed and ends with "length": look for a whole one)
        if r.choices[0].message.content and r.choices[0].message.tool_calls and r.choices[0].finish_reason == "tool_calls":
            break
    else:
        pytest.fail("no seed gave text and then a whole call")
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    for call in message.tool_calls:
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    with client.chat.completions.stream(**ask) as stream:
        final = stream.get_final_completion().choices[0].message
    assert final.content == message.content
    assert [(c.function.name, c.function.arguments) for c in final.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in message.tool_calls]


def test_still_answers_after_refusals(client):
    r = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "ok?"}])
    assert r.usage.completion_tokens == 2


def test_deployments_land_on_their_nodes(served):
    import ray
    from ray import serve

    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    vision = serve.get_deployment_handle("VisionEncoder", app_name="pixtral").stats.remote().result()
    decoder = serve.get_deployment_handle("Decoder", app_name="pixtral").info.remote().result()
    assert "vision_node" in nodes[vision["node_id"]]
    assert "decoder_node" in nodes[decoder["node_id"]]
    assert vision["node_id"] != decoder["node_id"]


def test_serve_run_demo_config_answers(served, mistral_12b, tmp_path):
    """`serve run deploy/demo.yaml` deploys onto the running cluster and answers (same HTTP proxy)."""
    import ray

    env = {**os.environ, "PIXTRAL_SERVE_CACHE": str(tmp_path)}
    address = ray.get_runtime_context().gcs_address
    serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
    proc = subprocess.Popen([serve_cli, "run", "--address", address, "deploy/demo.yaml"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        answer = None
        while time.time() < deadline and answer is None:
            time.sleep(2)
            try:
                r = httpx.post(f"{served}/v1/chat/completions", timeout=30, json={
                    "model": "pixtral-tiny-demo", "max_tokens": 3,
                    "messages": [{"role": "user", "content": "hello"}]})
                if r.status_code == 200:
                    answer = r.json()
            except httpx.HTTPError:
                pass
        assert answer is not None and answer["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        deploy_test_app(mistral_12b)  # give the session its own application back
        wait_healthy(served)


def test_the_mistralai_sdk_works(served):
    """The SDK the seed documents' users call: its own field names (random_seed, safe_prompt, ...),
    an image as a bare URL string, a JSON schema, and a forced tool call."""
    import jsonschema
    from mistralai.client import Mistral

    sdk = Mistral(api_key="unused", server_url=served)
    r = sdk.chat.complete(model=MODEL, max_tokens=8, random_seed=7, temperature=0.5, safe_prompt=False,
                          messages=[{"role": "user", "content": [
                              {"type": "text", "text": "What is this?"},
                              {"type": "image_url", "image_url": png_url(random_image(40, 30, 9))}]}])
    assert r.choices[0].message.content and r.usage.prompt_tokens > 0
    again = sdk.chat.complete(model=MODEL, max_tokens=8, random_seed=7, temperature=0.5, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": png_url(random_image(40, 30, 9))}]}])
    assert again.choices[0].message.content == r.choices[0].message.content  # random_seed is the seed
    schema = sdk.chat.complete(model=MODEL, max_tokens=120, temperature=0, messages=[{"role": "user", "content": "JSON"}],
                               response_format={"type": "json_schema",
                                                "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(schema.choices[0].message.content), PERSON)
    call = sdk.chat.complete(model=MODEL, max_tokens=80, temperature=0, tools=[WEATHER_TOOL], tool_choice="any",
                             parallel_tool_calls=False, messages=[{"role": "user", "content": "Weather?"}])
    assert call.choices[0].finish_reason == "tool_calls"
    assert call.choices[0].message.tool_calls[0].function.name == "get_weather"
