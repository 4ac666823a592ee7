"""Readiness with several models: the app stays ready while any model is, so that one model's
outage does not take the others out of the load balancer; `?model=` answers for one model."""

from __future__ import annotations

import asyncio

from serving.health import Readiness, model_readiness

MODELS = {"small": ["VisionEncoder-small", "Decoder-small"], "large": ["VisionEncoder-large", "Decoder-large"]}


def test_model_readiness_names_the_missing_deployment():
    running = {"VisionEncoder-small": 1, "Decoder-small": 2, "VisionEncoder-large": 1, "Decoder-large": 0}
    assert model_readiness(running, MODELS) == {"small": "ok", "large": "Decoder-large has no running replica"}
    assert model_readiness({}, {"small": MODELS["small"]}) == {"small": "VisionEncoder-small has no running replica"}


def answers(running: dict[str, int] | str, model: str | None = None):
    readiness = Readiness("app", MODELS)
    readiness._ask_controller = lambda: running if isinstance(running, str) else model_readiness(running, MODELS)
    return asyncio.run(readiness.get(model))


def test_the_app_is_ready_while_any_model_is():
    large_down = {"VisionEncoder-small": 1, "Decoder-small": 1, "VisionEncoder-large": 1}
    ready, why, models = answers(large_down)
    assert ready and why == "ok" and models["large"] == "Decoder-large has no running replica"
    assert answers(large_down, "small")[:2] == (True, "ok")
    assert answers(large_down, "large")[:2] == (False, "Decoder-large has no running replica")
    ready, why, _ = answers({"Decoder-small": 1})
    assert not ready and "small: VisionEncoder-small" in why and "large: VisionEncoder-large" in why
    assert answers("application 'app' is not deployed")[:2] == (False, "application 'app' is not deployed")
