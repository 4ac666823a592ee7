"""A short end-to-end run of the model on the built-in tiny checkpoint (no server, no downloads).

    python -m model.demo

Builds the tiny random-weight checkpoint once (cached), encodes a chat request with an image
through mistral-common, runs the model and prints the greedy tokens. The weights are random, so
the text is noise: the point is that every stage runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch


def demo_checkpoint() -> Path:
    from model.tiny import make_tiny_checkpoint

    cache = Path(os.environ.get("PIXTRAL_SERVE_CACHE", Path.home() / ".cache" / "pixtral-serve"))
    path = cache / "tiny-12b"
    if not (path / "params.json").exists():
        make_tiny_checkpoint(path, fmt="mistral", shape="12b")
    return path


def main() -> None:
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from PIL import Image

    from model import load_model
    from model.config import find_tokenizer_file
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    ckpt = demo_checkpoint()
    tokenizer = MistralTokenizer.from_file(str(find_tokenizer_file(ckpt)))
    gradient = np.linspace(0, 255, 96 * 64 * 3).reshape(64, 96, 3).astype(np.uint8)
    request = ChatCompletionRequest(messages=[UserMessage(content=[
        TextChunk(text="What is in this image?"), ImageChunk(image=Image.fromarray(gradient))])])
    encoded = tokenizer.encode_chat_completion(request)
    model = load_model(ckpt)
    images = [torch.from_numpy(np.ascontiguousarray(i)) for i in encoded.images]
    tokens = list(encoded.tokens)
    start = time.perf_counter()
    generated = []
    for _ in range(16):
        nxt = int(model.logits_no_cache(torch.tensor(tokens + generated), images)[-1].argmax())
        generated.append(nxt)
    print(f"checkpoint: {ckpt}")
    print(f"prompt: {len(tokens)} tokens ({tokens.count(10)} image tokens), image {gradient.shape[1]}x{gradient.shape[0]}")
    print(f"greedy tokens: {generated}")
    print(f"decoded (random weights): {tokenizer.decode(generated)!r}")
    print(f"{len(generated)} tokens in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
