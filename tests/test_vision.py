"""Vision encoder invariants: block-diagonal batching, feature counts, adapter variants."""

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
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate([(64, 32), (33, 70), (120, 120)])]
    _, pixels = encode_chat(mistral_12b, ["x", *images])
    with torch.inference_mode():
        batched, grids = model_12b.encode_images(pixels)
        alone = [model_12b.encode_images([p])[0] for p in pixels]
    assert grids == [(2, 4), (5, 3), (8, 8)], grids
    diff = (batched - torch.cat(alone)).abs().max().item()
    assert diff <= 1e-5, diff


def test_batched_encoding_is_not_full_attention(mistral_12b, model_12b):
    """Guard the guard: dropping the mask must change the features (else the test above is vacuous)."""
    _, pixels = encode_chat(mistral_12b, ["x", random_image(32, 32, 0), random_image(48, 16, 1)])
    with torch.inference_mode():
        alone = torch.cat([model_12b.encode_images([p])[0] for p in pixels])
        enc = model_12b.vision_encoder
        import model.vision_encoder as ve
        original = ve.block_diagonal_mask
        ve.block_diagonal_mask = lambda grids, device: None
        try:
            unmasked, _ = enc(pixels)
        finally:
            ve.block_diagonal_mask = original
    assert (unmasked - alone).abs().max() > 1e-3


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
