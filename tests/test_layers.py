"""The CPU-packed linear path: loaded models use it, it computes x @ W.T in fp32, batch-independently."""

import pytest
import torch
import torch.nn.functional as F

from model import load_model
from model.layers.linear import PackableLinear, linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_model_packs_its_linear_layers(mistral_12b, dtype):
    model = load_model(mistral_12b, dtype=dtype)
    layers = [m for m in model.modules() if isinstance(m, PackableLinear)]
    assert layers and all(m.packed_weight is not None for m in layers), "a linear layer runs unpacked"


@pytest.fixture(scope="module")
def head(mistral_12b):
    return load_model(mistral_12b, with_vision_encoder=False).output


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_packed_linear_equals_plain_and_ignores_batch_mates(head, rows):
    x = torch.randn(rows, head.weight.shape[1], generator=torch.Generator().manual_seed(rows))
    out = linear(x, head.weight, packed=head.packed_weight)
    exact = (x.double() @ head.weight.double().T)
    plain = F.linear(x, head.weight)
    # fp32 arithmetic: as close to the float64 product as the BLAS path is, within a small factor
    assert (out.double() - exact).abs().max() <= 4 * (plain.double() - exact).abs().max() + 1e-7
    # a row's result does not depend on which other rows share the call
    alone = linear(x[-1:], head.weight, packed=head.packed_weight)
    assert torch.equal(alone[0], out[-1])
