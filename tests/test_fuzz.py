"""Property-based fuzzing of the HTTP API: whatever arrives, never a 5xx, always OpenAI error JSON."""

from __future__ import annotations

import base64
import io
import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import random_image


def _png() -> str:
    buf = io.BytesIO()
    random_image(20, 20, 1).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG = _png()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
urls = st.sampled_from([PNG, PNG[:60], "data:image/png;base64,!!", "data:,", "http://127.0.0.1:9/x.png",
                        "http://169.254.169.254/", "ftp://example/x.png", "file:///etc/passwd", "", "not a url"])
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": urls | st.fixed_dictionaries({"url": urls}, optional={"detail": json_values})}),
    json_values)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]) | json_values,
     "content": st.text(max_size=60) | st.lists(part, max_size=3) | json_values})
body = st.fixed_dictionaries(
    {"model": st.sampled_from(["pixtral-test", "pixtral-12b-2409", "other"]) | json_values,
     "messages": st.lists(message, max_size=3) | json_values,
     "max_tokens": st.integers(-2, 4) | json_values},
    optional={"temperature": st.floats(-1, 3) | json_values, "top_p": st.floats(-0.5, 1.5) | json_values,
              "top_k": st.integers(-3, 100) | json_values, "n": st.integers(-1, 3) | json_values,
              "seed": st.integers(-2**70, 2**70) | json_values, "stream": st.booleans() | json_values,
              "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=6) | json_values,
              "presence_penalty": st.floats(-3, 3) | json_values, "frequency_penalty": st.floats(-3, 3),
              "logprobs": st.booleans() | json_values, "top_logprobs": st.integers(-2, 25) | json_values,
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
              "max_completion_tokens": st.integers(-1, 4) | json_values})


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=body | json_values)
def test_fuzzed_requests_never_get_5xx(served, payload):
    with httpx.Client(timeout=60) as client:
        # Python's json writes Infinity, which strict encoders refuse: the server must cope with it too
        r = client.post(f"{served}/v1/chat/completions", content=json.dumps(payload),
                        headers={"content-type": "application/json"})
        assert r.status_code < 500, (payload, r.status_code, r.text[:300])
        if r.status_code != 200:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"], r.text
            assert "Traceback" not in r.text


def test_server_answers_normally_after_fuzzing(served):
    r = httpx.post(f"{served}/v1/chat/completions", timeout=60, json={
        "model": "pixtral-test", "max_tokens": 3, "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
