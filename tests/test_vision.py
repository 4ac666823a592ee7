"""Vision encoder invariants: images batched without attending to each other, bounded memory, feature counts, adapter variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import load_model
from model.adapter import PatchMerger
from tests.helpers import encode_chat, random_image


@pytest.fixture(scope="module")
def model_12b(mistral_12b):
    return load_model(mistral_12b)


def test_batched_encoding_equals_one_at_a_time(mistral_12b, model_12b):
    # (64, 32) twice and (32, 64): three images of 8 patches share one attention call, in two
    # grid shapes; the others are alone in theirs
    sizes = [(64, 32), (33, 70), (64, 32), (120, 120), (32, 64)]
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    _, pixels = encode_chat(mistral_12b, ["x", *images])
    with torch.inference_mode():
        batched, grids = model_12b.encode_images(pixels)
        alone = [model_12b.encode_images([p])[0] for p in pixels]
    assert grids == [(2, 4), (5, 3), (2, 4), (8, 8), (4, 2)], grids
    diff = (batched - torch.cat(alone)).abs().max().item()
    assert diff <= 1e-5, diff


def test_vision_attention_is_one_maskless_call_per_image_size(mistral_12b, model_12b, monkeypatch):
    """Same-sized images share one 4-D SDPA call and nothing passes a mask, the shape fused kernels
    take (a mask, or 3-D inputs, keep CUDA on its slowest backend)."""
    import model.vision_encoder as ve

    calls = []
    real = ve.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        calls.append((tuple(q.shape), kwargs.get("attn_mask")))
        return real(q, k, v, **kwargs)

    _, pixels = encode_chat(mistral_12b, ["x", random_image(64, 32, 0), random_image(48, 48, 1), random_image(32, 64, 2)])
    monkeypatch.setattr(ve.F, "scaled_dot_product_attention", spy)
    with torch.inference_mode():
        model_12b.encode_images(pixels)
    args = model_12b.args.vision_encoder
    per_layer = [(2, args.num_attention_heads, 8, args.head_dim), (1, args.num_attention_heads, 9, args.head_dim)]
    assert [shape for shape, _ in calls] == per_layer * args.num_hidden_layers, calls
    assert all(mask is None for _, mask in calls)


VISION_PEAK_SCRIPT = """
import resource, sys, torch
from model.config import VisionEncoderArgs
from model.vision_encoder import VisionEncoder
torch.manual_seed(0)
args = VisionEncoderArgs(hidden_size=64, num_channels=3, max_image_size=1024, patch_size=16, rope_theta=10000.0,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_token_id=10,
                         image_break_token_id=12, image_end_token_id=13)
encoder = VisionEncoder(args).eval()
images = [torch.randn(3, 1024, 1024) for _ in range(int(sys.argv[1]))]
with torch.inference_mode():
    encoder(images[:1])  # warm up: allocator, kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    features, grids = encoder(images)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert features.shape == (len(images) * 64 * 64, 64), features.shape
print((after - before) // 1024)
"""


def test_vision_batch_peak_memory_is_linear_in_images():
    """4 images of 1024x1024 (16,384 patches): a block-diagonal mask alone would be 256 MiB, and the
    fp32 scores of one head 1 GiB. Per-image attention keeps the peak to the activations."""
    import subprocess
    import sys

    def peak_mib(n_images: int) -> int:
        out = subprocess.run([sys.executable, "-c", VISION_PEAK_SCRIPT, str(n_images)], check=True,
                             capture_output=True, text=True, timeout=300)
        return int(out.stdout.split()[-1])

    peak = peak_mib(4)
    # the activations of 16,384 patches at width 64 (and 128 in the MLP) are a few MiB each
    assert peak < 128, f"peak grew by {peak} MiB over one image's"


def test_patch_budget_slices():
    from serving.vision_encoder_server import patch_budget_slices

    assert patch_budget_slices([8, 8, 9, 30, 1], 20) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert patch_budget_slices([4096] * 8, 32768) == [(0, 8)]
    assert patch_budget_slices([4096] * 9, 32768) == [(0, 8), (8, 9)]
    assert patch_budget_slices([], 10) == []


def test_vision_replica_splits_a_batch_by_patch_budget(mistral_12b, monkeypatch):
    """A batch over the patch budget runs as several forwards, each within it, with the same features."""
    import numpy as np

    from model.loader import load_vision_encoder
    from serving.images import ImagePayload
    from serving.vision_encoder_server import VisionEncoderServer

    server = object.__new__(VisionEncoderServer.func_or_class)  # the replica's logic, without Serve
    server.encoder, server.device, server.error = load_vision_encoder(mistral_12b), torch.device("cpu"), None
    rng = np.random.default_rng(0)
    payloads = [ImagePayload(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (w, h), f"i{i}")
                for i, (w, h) in enumerate([(64, 32), (32, 64), (48, 48), (96, 80)])]  # 8, 8, 9, 30 patches
    forwards = []
    encoder_forward = server.encoder.forward
    monkeypatch.setattr(server.encoder, "forward", lambda images: forwards.append(len(images)) or encoder_forward(images))
    server.max_batch_patches = 1 << 15
    whole = server._encode_now(payloads)
    server.max_batch_patches = 20
    split = server._encode_now(payloads)
    assert forwards == [4, 2, 1, 1]
    for a, b in zip(whole, split):
        assert a.grid == b.grid and (a.features - b.features).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(1, 1), (70, 40), (2000, 1000), (3000, 10), (1024, 1024)])
def test_feature_count_equals_img_tokens(size, mistral_12b, model_12b):
    tokens, pixels = encode_chat(mistral_12b, ["look", random_image(*size)])
    with torch.inference_mode():
        feats, grids = model_12b.encode_images(pixels)
        embeds = model_12b.project_images(feats, grids)
    n_img = tokens.count(model_12b.args.vision_encoder.image_token_id)
    assert embeds.shape[0] == n_img, (size, embeds.shape, n_img)
    h, w = grids[0]
    assert tokens.count(model_12b.args.vision_encoder.image_break_token_id) == h - 1
    assert tokens.count(model_12b.args.vision_encoder.image_end_token_id) == 1


def test_patch_merger_concatenates_neighbour_blocks():
    torch.manual_seed(0)
    dim, m, (h, w) = 3, 2, (4, 6)
    merger = PatchMerger(dim, m)
    feats = torch.randn(h * w, dim)
    out = merger(feats, [(h, w)])
    grid = feats.view(h, w, dim)
    rows = []
    for i in range(0, h, m):
        for j in range(0, w, m):
            block = grid[i:i + m, j:j + m]  # (m, m, d); unfold orders channel-major, then (a, b)
            rows.append(block.permute(2, 0, 1).reshape(-1))
    expected = F.linear(torch.stack(rows), merger.merging_layer.weight)
    assert out.shape == (h * w // (m * m), dim)
    torch.testing.assert_close(out, expected)
