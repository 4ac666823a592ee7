"""Shared test helpers: requests encoded by mistral-common, reference models from transformers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.config import find_tokenizer_file


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def inner_tokenizer(path: Path):
    """The inner tokenizer (Tekken or SentencePiece) of a mistral-common tokenizer file."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


def mistral_tokenizer(checkpoint: Path):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(find_tokenizer_file(checkpoint)))


def encode_chat(checkpoint: Path, parts: list, system: str | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """parts: strings and PIL images of one user message -> (tokens, normalised images) by mistral-common."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    chunks = [TextChunk(text=p) if isinstance(p, str) else ImageChunk(image=p) for p in parts]
    messages = ([SystemMessage(content=system)] if system else []) + [UserMessage(content=chunks)]
    encoded = mistral_tokenizer(checkpoint).encode_chat_completion(ChatCompletionRequest(messages=messages))
    return encoded.tokens, [torch.from_numpy(np.ascontiguousarray(img)) for img in encoded.images]


def hf_model(checkpoint: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


def hf_inputs(tokens: list[int], images: list[torch.Tensor]) -> dict:
    """transformers' Llava takes images padded into one batch plus their true sizes."""
    inputs = {"input_ids": torch.tensor([tokens])}
    if images:
        h = max(i.shape[1] for i in images)
        w = max(i.shape[2] for i in images)
        pixels = torch.zeros(len(images), 3, h, w)
        for k, img in enumerate(images):
            pixels[k, :, : img.shape[1], : img.shape[2]] = img
        inputs["pixel_values"] = pixels
        inputs["image_sizes"] = torch.tensor([[i.shape[1], i.shape[2]] for i in images])
    return inputs


def image_features(model, pixels: list[torch.Tensor]):
    """Pre-adapter features per image, as the vision pool would ship them."""
    from model.engine.model_runner import ImageFeatures

    with torch.inference_mode():
        return [ImageFeatures(*(lambda f, g: (f, g[0]))(*model.encode_images([p]))) for p in pixels]


def greedy_reference(model, tokens: list[int], pixels: list[torch.Tensor], n: int, eos: int | None = None) -> list[int]:
    """Greedy decoding by full re-forward without any cache: the engine's ground truth."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(model.logits_no_cache(torch.tensor(tokens + out), pixels)[-1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out


# -- the running application -------------------------------------------------------------

@contextlib.contextmanager
def loopback_http(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 for image-fetch tests; yields its base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True  # a handler still dripping bytes must not hold up shutdown
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_root(checkpoint) -> Path:
    """The test application's directory for file:// image URLs."""
    root = Path(checkpoint).parent / "served-images"
    root.mkdir(exist_ok=True)
    return root


def app_args(checkpoint) -> dict:
    """The test application: tiny checkpoint, vision pool and decoder pinned to their nodes."""
    return {
        "images": {"file_root": str(image_root(checkpoint))},
        "model": str(checkpoint), "served_model_name": "pixtral-test", "model_aliases": ["pixtral-12b-2409"],
        "ingress": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
        "vision": {"num_cpus": 0.1, "num_replicas": 1, "resources": {"vision_node": 1}},
        "decoder": {"cpus_per_rank": 0.5, "kv_cache_bytes": 64 << 20, "resources": {"decoder_node": 1}},
        "max_model_len": 10240,
        "max_body_bytes": 8 << 20,
    }


def deploy_beside(served: str, args: dict, name: str, timeout: float = 180) -> str:
    """build_app(args) as a Serve application of its own at /name, beside the session's app: its
    URL, once healthy."""
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    base = f"{served}/{name}"
    wait_healthy(base, timeout)
    return base


def delete_app(name: str) -> None:
    from ray import serve

    if name in serve.status().applications:
        serve.delete(name)


def wait_healthy(base: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{base} never became healthy")


def deploy_test_app(checkpoint) -> None:
    from ray import serve

    from serving.app import build_app

    serve.run(build_app(app_args(checkpoint)), name="pixtral", route_prefix="/", blocking=False)


