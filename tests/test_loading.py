"""Checkpoint loading: both formats, clear errors, dtype/device, no serving imports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from model import load_model, load_model_args
from model.loader import CheckpointError
from model.tiny import make_tiny_checkpoint


def test_formats_read_the_same_config(hf_12b, mistral_12b):
    assert load_model_args(hf_12b) == load_model_args(mistral_12b)
    v = load_model_args(hf_12b).vision_encoder
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 12, 13)


def test_large_shape_uses_v7m1_ids(mistral_large):
    args = load_model_args(mistral_large)
    v = args.vision_encoder
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 14, 15)
    assert args.vocab_size == 32768 and not v.adapter_bias and args.n_heads * args.head_dim == args.dim


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_mismatched_tensor_is_named(mistral_12b, tmp_path):
    ckpt = _copy(mistral_12b, tmp_path / "ckpt")
    params = json.loads((ckpt / "params.json").read_text())
    params["hidden_dim"] = 96
    (ckpt / "params.json").write_text(json.dumps(params))
    # every layer's w1, w2 and w3 are named (the first five), with both shapes
    with pytest.raises(CheckpointError, match=r"6 mis-shaped tensors: layers\.0\.feed_forward\.w1\.weight: "
                                              r"checkpoint shape \(128, 64\) != model shape \(96, 64\)"):
        load_model(ckpt)


def test_bf16_load_and_decoder_only_replica(mistral_12b):
    model = load_model(mistral_12b, dtype=torch.bfloat16, with_vision_encoder=False)
    assert model.vision_encoder is None
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    logits = model.logits_no_cache(torch.tensor([1, 3, 100, 200, 4]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_checkpoint_loads_into_fp32(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "bf16", shape="large", dtype=torch.bfloat16)
    model = load_model(ckpt, dtype=torch.float32)
    assert model.output.weight.dtype == torch.float32


def test_import_model_does_not_import_serving_stack():
    code = ("import sys, model, model.tiny, model.convert, model.loader; "
            "bad = [m for m in ('ray', 'fastapi', 'pydantic') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
