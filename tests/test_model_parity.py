"""Our Pixtral equals transformers' LlavaForConditionalGeneration on the same random weights."""

from __future__ import annotations

import pytest
import torch

from model import load_model
from tests.helpers import encode_chat, hf_inputs, hf_model, random_image

TOL = 1e-4

PROMPTS = {
    "text_only": lambda: ["Tell me a short story about a lighthouse."],
    "one_image": lambda: ["What is in this picture?", random_image(70, 40, seed=3)],
    "two_images": lambda: ["Compare", random_image(64, 96, seed=4), "with", random_image(150, 33, seed=5), "please."],
}


@pytest.fixture(scope="module")
def hf_12b_model(hf_12b):
    return hf_model(hf_12b)


@pytest.mark.parametrize("fmt", ["hf", "mistral"])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_logits_match_transformers(fmt, prompt, hf_12b, mistral_12b, hf_12b_model):
    checkpoint = hf_12b if fmt == "hf" else mistral_12b
    tokens, images = encode_chat(checkpoint, PROMPTS[prompt]())
    ours = load_model(checkpoint).logits_no_cache(torch.tensor(tokens), images)
    with torch.inference_mode():
        ref = hf_12b_model(**hf_inputs(tokens, images)).logits[0].float()
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{prompt} ({fmt}): max |logit diff| {diff:.2e} > {TOL}"
    assert ref.std() > 0.1  # random weights still give informative logits


def greedy_loop(model, tokens: list[int], images: list[torch.Tensor], n: int) -> list[int]:
    """Plain greedy decoding by full re-forward: the reference loop before the engine exists."""
    out = []
    seq = list(tokens)
    for _ in range(n):
        nxt = int(model.logits_no_cache(torch.tensor(seq), images)[-1].argmax())
        out.append(nxt)
        seq.append(nxt)
    return out


@pytest.mark.parametrize("shape", ["12b", "large"])
def test_greedy_generation_matches_transformers(shape, request):
    hf_dir = request.getfixturevalue(f"hf_{shape}")
    mistral_dir = request.getfixturevalue(f"mistral_{shape}")
    tokens, images = encode_chat(mistral_dir, ["Describe", random_image(48, 80, seed=7), "in detail."])
    ours = greedy_loop(load_model(mistral_dir), tokens, images, 16)
    ref_model = hf_model(hf_dir)
    with torch.inference_mode():
        out = ref_model.generate(**hf_inputs(tokens, images), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    ref = out[0, len(tokens):].tolist()
    assert ours == ref, (ours, ref)
