"""Several models in one application: one ingress routes by `model` to each model's own pools."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from model import load_model
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from serving.cli import configs_from_args, parse_args
from serving.config import app_args, deployment_names, model_configs
from tests.helpers import delete_app, deploy_beside, encode_chat, image_features, random_image
from tests.test_metrics import increase, scrape
from tests.test_serving import image_part

TWO_MODELS = {
    # app-wide, and defaults every model shares
    "ingress": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
    "max_model_len": 1024,
    "vision": {"num_cpus": 0.1, "num_replicas": 1},
    "decoder": {"cpus_per_rank": 0.2, "kv_cache_bytes": 32 << 20},
}


# -- the config ------------------------------------------------------------------------------

def test_entries_take_the_shared_keys_and_override_them_section_by_key():
    small, large = model_configs({**TWO_MODELS, "api_keys": ["k"], "models": [
        {"model": "/a", "served_model_name": "a", "model_aliases": ["a-latest"]},
        {"model": "/b", "served_model_name": "b", "max_model_len": 4096, "decoder": {"tensor_parallel_size": 2}}]})
    assert (small.max_model_len, large.max_model_len) == (1024, 4096)
    assert large.decoder.tensor_parallel_size == 2 and large.decoder.cpus_per_rank == 0.2  # merged by key
    assert small.decoder.tensor_parallel_size == 1
    assert small.api_keys == large.api_keys == ["k"] and small.ingress == large.ingress
    assert deployment_names(large, several=True) == ("VisionEncoder-b", "Decoder-b")
    assert deployment_names(large, several=False) == ("VisionEncoder", "Decoder")
    # the CLI's fitted configs go back to build_app's args and come out the same
    assert model_configs(app_args([small, large])) == [small, large]
    assert model_configs(app_args([small])) == [small]


@pytest.mark.parametrize("models, error", [
    ([], "non-empty list"),
    ([{"model": "/a", "served_model_name": "a", "api_keys": ["k"]}], r"\['api_keys'\], which are app-wide"),
    ([{"model": "/a", "served_model_name": "a", "model_aliases": ["x"]},
      {"model": "/b", "served_model_name": "x"}], "'x' is used by both 'a' and 'x'"),
    ([{"model": "/a", "served_model_name": "m/1"}, {"model": "/b", "served_model_name": "m:1"}], "punctuation"),
    ([{"model": "/a", "served_model_name": "a", "decoder": {"tensor_paralel_size": 2}}], "unknown decoder config keys"),
])
def test_bad_model_lists_are_refused_with_the_reason(models, error):
    with pytest.raises(ValueError, match=error):
        model_configs({"models": models})


def test_cli_serves_a_config_of_several_models_and_refuses_per_model_flags(tmp_path):
    import yaml

    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"model": "/a", "served_model_name": "a"},
                                               {"model": "/b", "served_model_name": "b"}]}))
    configs = configs_from_args(parse_args(["--config", str(path), "--api-key", "k"]))
    assert [c.served_model_name for c in configs] == ["a", "b"] and all(c.api_keys == ["k"] for c in configs)
    with pytest.raises(SystemExit, match="--model, --tensor-parallel-size configure one model"):
        configs_from_args(parse_args(["--config", str(path), "--model", "/c", "--tensor-parallel-size", "2"]))


# -- the running application -----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(served, mistral_12b, mistral_large):
    """A 12B-shaped model (Tekken) and a Large-shaped one (SentencePiece v7) behind one ingress."""
    args = {**TWO_MODELS, "models": [
        {"model": str(mistral_12b), "served_model_name": "tiny-12b", "model_aliases": ["pixtral-12b-2409"]},
        {"model": str(mistral_large), "served_model_name": "tiny-large", "model_aliases": ["pixtral-large-latest"]},
    ]}
    yield deploy_beside(served, args, "multi")
    delete_app("multi")


def _direct_greedy(checkpoint, parts: list, max_tokens: int) -> str:
    """The model's own engine, in this process, on the prompt mistral-common encodes."""
    tokens, pixels = encode_chat(checkpoint, parts)
    model = load_model(checkpoint)
    engine = build_local_engine(checkpoint, model=model, num_blocks=64)
    engine.add_request("direct", tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                       image_features(model, pixels))
    return "".join(o.text for o in engine.run_to_completion()["direct"])


def test_each_model_answers_greedily_as_its_own_engine(two_models, mistral_12b, mistral_large, ray_cluster):
    from ray import serve

    client = openai.OpenAI(base_url=f"{two_models}/v1", api_key="x", max_retries=0, timeout=120)
    listed = {m.id: m.model_extra["root"] for m in client.models.list().data}
    assert listed == {"tiny-12b": "tiny-12b", "pixtral-12b-2409": "tiny-12b",
                      "tiny-large": "tiny-large", "pixtral-large-latest": "tiny-large"}
    health = httpx.get(f"{two_models}/health")  # each model's readiness; ?model= takes an alias too
    assert health.status_code == 200 and health.json()["models"] == {"tiny-12b": "ok", "tiny-large": "ok"}
    assert httpx.get(f"{two_models}/health", params={"model": "pixtral-large-latest"}).status_code == 200
    deployments = serve.status().applications["multi"].deployments
    assert set(deployments) == {"OpenAIIngress", "VisionEncoder-tiny-12b", "Decoder-tiny-12b",
                                "VisionEncoder-tiny-large", "Decoder-tiny-large"}
    before = scrape(ray_cluster.metrics_ports)
    img = random_image(60, 40, 21)
    generated = {}
    for name, alias, checkpoint in (("tiny-12b", "pixtral-12b-2409", mistral_12b),
                                    ("tiny-large", "pixtral-large-latest", mistral_large)):
        expected = _direct_greedy(checkpoint, ["Describe", img], 8)
        for asked in (name, alias):
            r = client.chat.completions.create(model=asked, max_tokens=8, temperature=0, messages=[
                {"role": "user", "content": [{"type": "text", "text": "Describe"}, image_part(img)]}])
            assert r.model == asked and r.choices[0].message.content == expected, (name, asked)
            generated[name] = generated.get(name, 0) + r.usage.completion_tokens
        count = httpx.post(f"{two_models}/v1/chat/token_count", json={"model": alias, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe"}, image_part(img)]}]}).json()
        assert count["model"] == name and count["prompt_tokens"] == len(encode_chat(checkpoint, ["Describe", img])[0])
    r = httpx.post(f"{two_models}/v1/chat/completions", json={"model": "no-such-model", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "tiny-large" in r.json()["error"]["message"]
    # every model's metrics carry its own label; what belongs to no one model (the unknown model's
    # 404, the ingress's event-loop lag) carries the app's models, joined
    app_label = "tiny-12b,tiny-large"
    deadline = time.time() + 30
    while time.time() < deadline:
        after = scrape(ray_cluster.metrics_ports)
        got = {name: increase(before, after, "ray_pixtral_generation_tokens_total", model=name) for name in generated}
        http = {name: increase(before, after, "ray_pixtral_http_requests_total", model=name, status_code="200")
                for name in generated}
        unknown = increase(before, after, "ray_pixtral_http_requests_total", model=app_label, status_code="404")
        if got == generated and all(v >= 3 for v in http.values()) and unknown == 1:
            break
        time.sleep(1)
    assert got == generated
    assert all(v >= 3 for v in http.values()), http  # 2 completions + 1 token count each
    assert unknown == 1
    assert increase(before, after, "ray_pixtral_event_loop_lag_seconds_count", model=app_label) > 0
    unnamed = [name for name, labels in after if not dict(labels).get("model")]
    assert not unnamed, unnamed[:3]
