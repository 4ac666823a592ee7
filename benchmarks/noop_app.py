"""A Ray Serve app that answers at once: the floor of what any Serve HTTP app costs."""

from fastapi import FastAPI
from ray import serve

noop = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(noop)
class NoOp:
    @noop.post("/")
    async def answer(self) -> dict:
        return {"choices": []}


def noop_app():
    return NoOp.bind()
