"""CPU linear layers: each dtype takes the path this CPU supports (oneDNN-packed weights, or the
plain matmul where it cannot pack, e.g. bf16 without AVX-512), computes x @ W.T to its dtype's
precision, and gives a row the same bits whatever else shares the batch.

The suite runs on any CPU as it is, and with PIXTRAL_SERVE_CPU_PACKING=float32 it runs the way a
CPU without AVX-512 does on one that has it."""

import logging

import pytest
import torch
import torch.nn.functional as F

from model import load_model
from model.layers import linear as linear_module
from model.layers.linear import (PACKING_ENV, PackableLinear, linear, packed_rows, packed_rows_independent,
                                 packing_path, packing_unsupported_reason)

DTYPES = [torch.float32, torch.bfloat16]


def packable_layers(model):
    return [m for m in model.modules() if isinstance(m, PackableLinear)]


def test_bf16_packing_follows_what_pytorch_says_the_cpu_can_do(monkeypatch):
    monkeypatch.delenv(PACKING_ENV, raising=False)
    # PyTorch's own CPU check (AVX-512 BW/VL/DQ or AVX-NE-CONVERT) must agree with our probe,
    # which packs and runs a tiny layer: on a CPU without the feature, bf16 takes the plain matmul.
    assert packing_path(torch.bfloat16)[0] == torch.ops.mkldnn._is_mkldnn_bf16_supported(), \
        packing_unsupported_reason(torch.bfloat16)
    assert packing_path(torch.float32)[0] == torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loaded_model_takes_the_path_its_cpu_supports_and_logs_it(mistral_12b, dtype, monkeypatch, caplog):
    monkeypatch.delenv(PACKING_ENV, raising=False)
    linear_module._log_packing_path.cache_clear()
    packs, why = packing_path(dtype)
    with caplog.at_level(logging.INFO, logger=linear_module.__name__):
        model = load_model(mistral_12b, dtype=dtype)
    layers = packable_layers(model)
    assert layers and all((m.packed_weight is not None) == packs for m in layers), (dtype, packs, why)
    lines = [r.getMessage() for r in caplog.records if r.name == linear_module.__name__]
    name = str(dtype).removeprefix("torch.")
    assert len(lines) == 1 and lines[0].startswith(f"CPU linear layers in {name}: ") and why in lines[0], lines
    assert ("packed at load" in lines[0]) == packs, lines
    logits = model.logits_no_cache(torch.tensor([1, 3, 100, 200, 4]))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("setting, packed_dtypes", [("float32", {torch.float32}), ("none", set())])
def test_environment_switch_forces_the_plain_path(mistral_12b, setting, packed_dtypes, monkeypatch):
    """`float32` is what a CPU without AVX-512 gets; the suite can run that way on any CPU."""
    monkeypatch.setenv(PACKING_ENV, setting)
    for dtype in DTYPES:
        layers = packable_layers(load_model(mistral_12b, dtype=dtype, with_vision_encoder=False))
        expected = dtype in packed_dtypes and packing_unsupported_reason(dtype) is None
        assert all((m.packed_weight is not None) == expected for m in layers), (setting, dtype)


def test_bf16_plain_and_packed_models_agree_with_fp32(mistral_12b, monkeypatch):
    """The plain bf16 path serves the same model: its logits track fp32's within bf16 precision."""
    monkeypatch.setenv(PACKING_ENV, "float32")
    tokens = torch.tensor([1, 3, 100, 200, 4, 9, 77])
    reference = load_model(mistral_12b, dtype=torch.float32, with_vision_encoder=False).logits_no_cache(tokens)
    plain = load_model(mistral_12b, dtype=torch.bfloat16, with_vision_encoder=False)
    assert all(m.packed_weight is None for m in packable_layers(plain))
    error = (plain.logits_no_cache(tokens) - reference).abs().max().item()
    assert error <= 0.05 * reference.abs().max().item(), (error, reference.abs().max().item())


@pytest.fixture(scope="module", params=DTYPES, ids=str)
def head(request, mistral_12b):
    """The LM head (131k x dim) as loaded on this CPU: packed, or plain where the CPU cannot pack."""
    return load_model(mistral_12b, dtype=request.param, with_vision_encoder=False).output


def bound(x: torch.Tensor, weight: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """How far from the float64 product a correct result in x's dtype may be, per element."""
    if x.dtype == torch.float32:  # fp32 arithmetic: within a small factor of the BLAS path's error
        blas = F.linear(x, weight).double()
        return torch.full_like(exact, 4 * (blas - exact).abs().max().item() + 1e-7)
    # bf16 inputs, fp32 accumulation, result rounded to bf16 (8 significant bits)
    magnitude = x.double().abs() @ weight.double().abs().T
    return 2.0 ** -8 * exact.abs() + 2.0 ** -20 * magnitude


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
def test_linear_is_exact_to_its_dtype_and_ignores_batch_mates(head, rows):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, head.weight.shape[1], generator=gen).to(head.weight.dtype)
    out = linear(x, head.weight, packed=head.packed_weight)
    assert out.dtype == head.weight.dtype
    exact = x.double() @ head.weight.double().T
    excess = (out.double() - exact).abs() - bound(x, head.weight, exact)
    assert excess.max() <= 0, (head.weight.dtype, head.packed_weight is not None, excess.max().item())
    alone = linear(x[-1:], head.weight, packed=head.packed_weight)
    packed = head.packed_weight is not None
    if packed and packed_rows_independent(x.dtype) or not packed and x.dtype == torch.bfloat16:
        # a row's result does not depend on which other rows share the call: PyTorch 2.13's oneDNN
        # packed kernel, and PyTorch's own bf16 GEMM (what a CPU without AVX-512 runs), reduce each
        # row alone (test_row_independence_probe_tells_the_truth).
        assert torch.equal(alone[0], out[-1]), (head.weight.dtype, packed)
    else:
        # fp32 unpacked (only with PIXTRAL_SERVE_CPU_PACKING set, or a PyTorch without oneDNN): MKL's
        # sgemm switches kernels below 12 rows; older oneDNN (PyTorch 2.11) packed blocks rows by 6.
        # Either way a row may differ from its batched result by rounding.
        assert (alone[0] - out[-1]).abs().max() <= bound(x[-1:], head.weight, exact[-1:]).max()


def test_row_independence_probe_tells_the_truth(head):
    """`packed_rows_independent` decides on a small layer; the real LM head, a row alone against
    the same rows in batches of 7 and 40, must agree with its verdict either way."""
    if head.packed_weight is None:
        return
    x = torch.randn(40, head.weight.shape[1], generator=torch.Generator().manual_seed(4)).to(head.weight.dtype)
    alone = torch.cat([linear(x[i:i + 1], head.weight, packed=head.packed_weight) for i in range(len(x))])
    independent = all(torch.equal(linear(x[:rows], head.weight, packed=head.packed_weight), alone[:rows])
                      for rows in (7, 40))
    assert independent == packed_rows_independent(head.weight.dtype), torch.__version__


def test_packed_row_counts_are_few_and_padding_changes_no_row(head):
    """oneDNN compiles and caches a kernel per row count: the packed path rounds counts up to a
    bounded set (a long-running server's memory stays flat), and the zero rows change nothing."""
    counts = [packed_rows(m) for m in range(1, 8193)]
    assert len(set(counts)) <= 88
    assert all(m <= c <= m * 9 / 8 for m, c in zip(range(1, 8193), counts))
    if head.packed_weight is None:
        return  # this CPU runs this dtype on the plain path, which pads nothing
    x = torch.randn(300, head.weight.shape[1], generator=torch.Generator().manual_seed(3)).to(head.weight.dtype)
    assert packed_rows(300) == 320
    unpadded = torch.ops.mkldnn._linear_pointwise(x, head.packed_weight, None, "none", [], "")
    assert torch.equal(linear(x, head.weight, packed=head.packed_weight), unpadded)
