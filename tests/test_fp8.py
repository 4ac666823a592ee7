"""FP8 checkpoints (FP8-dynamic, per-channel weight scales) load and run: dequantised on the fly
on CPU, within bf16 tolerance of dequantising the weights up front."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from model import load_model, load_model_args
from model.convert import FP8_WEIGHTS, write_hf, write_hf_fp8
from model.layers.fp8 import FP8_DTYPE, dequantize, fp8_linear, quantize_per_channel
from model.loader import checkpoint_places
from model.parallel import ParallelContext
from model.tiny import SHAPES, random_state, tiny_args, tokenizer_path

PROMPT = torch.tensor([1, 3, 1500, 2200, 4, 900, 77])
TP2 = {"n_heads": 4, "n_kv_heads": 2}  # tiny 12B shape; every parallel cut is even


@pytest.fixture(scope="module")
def fp8_and_reference(tmp_path_factory):
    """An FP8 checkpoint, and a bf16 one holding its weights dequantised up front."""
    args = tiny_args("12b", TP2)
    state = random_state(args, seed=3)
    tokenizer = tokenizer_path(SHAPES["12b"]["tokenizer"])
    fp8 = write_hf_fp8(state, args, tokenizer, tmp_path_factory.mktemp("fp8"))
    upfront = {}
    for name, t in state.items():
        if FP8_WEIGHTS.fullmatch(name):
            upfront[name] = dequantize(*quantize_per_channel(t, torch.bfloat16), torch.float32).bfloat16()
        else:
            upfront[name] = t.bfloat16()
    reference = write_hf(upfront, args, tokenizer, tmp_path_factory.mktemp("dequantized"))
    return fp8, reference


def test_fp8_logits_within_bf16_tolerance_of_upfront_dequantisation(fp8_and_reference):
    fp8_dir, reference_dir = fp8_and_reference
    assert load_model_args(fp8_dir).quantization == "fp8"
    fp8 = load_model(fp8_dir, dtype=torch.bfloat16)
    reference = load_model(reference_dir, dtype=torch.bfloat16)
    layer = fp8.layers[0]
    assert layer.attention.wqkv.weight.dtype == FP8_DTYPE and layer.feed_forward.w2.weight.dtype == FP8_DTYPE
    assert layer.attention.wqkv.weight_scale.dtype == torch.float32
    assert fp8.output.weight.dtype == torch.bfloat16 and fp8.vision_encoder.transformer.layers[0].attention.wq.weight.dtype == torch.bfloat16
    # what FP8 saves: one byte per decoder linear weight instead of two
    linear_bytes = {name: sum(p.numel() * p.element_size() for n, p in m.named_parameters()
                              if n.startswith("layers.") and n.endswith((".wqkv.weight", ".wo.weight", ".w13.weight", ".w2.weight")))
                    for name, m in (("fp8", fp8), ("bf16", reference))}
    assert linear_bytes["fp8"] * 2 == linear_bytes["bf16"]
    got, want = fp8.logits_no_cache(PROMPT), reference.logits_no_cache(PROMPT)
    # bf16 tolerance: the two differ only in bf16 rounding of the matmuls' operands
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2 ** -7 * scale, ((got - want).abs().max(), scale)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fp8_tensor_parallel_shards_weights_and_scales(fp8_and_reference):
    fp8_dir, _ = fp8_and_reference
    whole = checkpoint_places(load_model(fp8_dir, dtype=torch.bfloat16, with_vision_encoder=False))
    for rank in range(2):
        shard = load_model(fp8_dir, dtype=torch.bfloat16, tp=ParallelContext(rank, 2), with_vision_encoder=False)
        for name, (target, where) in checkpoint_places(shard).items():
            full = whole[name][0]
            expected = full.narrow(where.dim, where.start, where.size) if where else full
            # FP8 has no equality kernel on CPU: compare the bytes
            assert torch.equal(target.view(torch.uint8) if target.dtype == FP8_DTYPE else target,
                               expected.view(torch.uint8) if expected.dtype == FP8_DTYPE else expected), name
        assert shard.layers[0].feed_forward.w2.weight_scale.shape == (64, 1)  # row-parallel: every output row


def test_fp8_linear_matches_dequantised_matmul():
    torch.manual_seed(0)
    w8, scale = quantize_per_channel(torch.randn(48, 32), torch.float32)
    x = torch.randn(5, 32)
    torch.testing.assert_close(fp8_linear(x, w8, scale), x @ (w8.float() * scale).T)
    # quantisation keeps each row within FP8's relative precision (3 mantissa bits)
    w = torch.randn(48, 32)
    w8, scale = quantize_per_channel(w, torch.float32)
    assert ((dequantize(w8, scale, torch.float32) - w).abs() <= 2 ** -4 * w.abs().amax(1, keepdim=True)).all()


@pytest.mark.parametrize("edit, message", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="tensor"),
     r"weights \{'strategy': 'tensor'\}: only static FP8 weights with one scale per output channel"),
    (lambda q: q.update(quant_method="gptq"), "quant_method 'gptq'"),
    (lambda q: q["ignore"].remove("language_model.lm_head"), "ignore does not list lm_head"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8}), "an FP8 KV cache is not supported"),
])
def test_unsupported_quantization_is_named(fp8_and_reference, tmp_path, edit, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fp8_and_reference[0], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    edit(config["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model_args(ckpt)


@pytest.mark.gpu
def test_fp8_matmul_on_gpu_tracks_dequantised():
    """On FP8 tensor cores (sm89+): per-token activation quantisation adds FP8 rounding of x."""
    torch.manual_seed(0)
    w8, scale = quantize_per_channel(torch.randn(256, 512), torch.float32)
    x = torch.randn(64, 512, dtype=torch.bfloat16)
    want = x.float() @ (w8.float() * scale).T
    got = fp8_linear(x.cuda(), w8.cuda(), scale.cuda()).float().cpu()
    assert ((got - want).abs().max() / want.abs().max()) < 0.05
