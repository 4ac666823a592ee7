"""The published checkpoint variants load: configs shaped like the real files, at tiny sizes.

Each config below carries every field of the published file it mirrors, with the real values
except for sizes (those are the tiny checkpoint's). The weights are the tiny checkpoint's own, so a
variant must give the same logits as the file our writer produced. Sources of the field lists:
mistral-inference's VisionEncoderArgs (12B params.json before December 2024 had no break/end ids),
a copy of Pixtral-Large-Instruct-2411's params.json, and transformers' Pixtral converter and
configuration tests (mistral-community/pixtral-12b, whose text config says 1,024,000 positions).
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from model import load_model, load_model_args
from model.config import TRAINED_CONTEXT
from model.engine.local_executor import engine_config_for

PROMPT = torch.tensor([1, 3, 1500, 2200, 4])


def _sizes(ckpt) -> dict:
    return json.loads((ckpt / "params.json").read_text())


def params_12b(tiny: dict, with_image_ids: bool) -> dict:
    """Pixtral-12B-2409 params.json (the current file, or the one released in September 2024)."""
    v = tiny["vision_encoder"]
    vision = {"hidden_size": v["hidden_size"], "num_channels": 3, "image_size": 1024, "patch_size": 16,
              "rope_theta": 10000.0, "intermediate_size": v["intermediate_size"],
              "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
              "image_token_id": 10}
    if with_image_ids:
        vision.update(image_break_token_id=12, image_end_token_id=13)
    return {"dim": tiny["dim"], "n_layers": tiny["n_layers"], "head_dim": tiny["head_dim"],
            "hidden_dim": tiny["hidden_dim"], "n_heads": tiny["n_heads"], "n_kv_heads": tiny["n_kv_heads"],
            "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 131072, "vision_encoder": vision}


def params_large(tiny: dict) -> dict:
    """Pixtral-Large-Instruct-2411 params.json."""
    v = tiny["vision_encoder"]
    return {"dim": tiny["dim"], "n_layers": tiny["n_layers"], "head_dim": tiny["head_dim"],
            "hidden_dim": tiny["hidden_dim"], "n_heads": tiny["n_heads"], "n_kv_heads": tiny["n_kv_heads"],
            "rope_theta": 1000000000.0, "norm_eps": 1e-05, "vocab_size": 32768,
            "vision_encoder": {"hidden_size": v["hidden_size"], "num_channels": 3, "image_size": 1024,
                               "patch_size": 16, "rope_theta": 10000.0, "intermediate_size": v["intermediate_size"],
                               "num_hidden_layers": v["num_hidden_layers"],
                               "num_attention_heads": v["num_attention_heads"], "image_token_id": 10,
                               "image_break_token_id": 14, "image_end_token_id": 15, "adapter_bias": False}}


def hf_config_12b(tiny: dict, hidden_act: str | None = "silu") -> dict:
    """mistral-community/pixtral-12b config.json (transformers' converter output)."""
    v = tiny["vision_encoder"]
    vision = {"model_type": "pixtral", "head_dim": v["hidden_size"] // v["num_attention_heads"],
              "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
              "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
              "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0, "is_composition": True,
              "tie_word_embeddings": False}
    if hidden_act:
        vision["hidden_act"] = hidden_act
    text = {"model_type": "mistral", "hidden_size": tiny["dim"], "head_dim": tiny["head_dim"],
            "num_attention_heads": tiny["n_heads"], "intermediate_size": tiny["hidden_dim"], "is_composition": True,
            "max_position_embeddings": 1024000, "num_hidden_layers": tiny["n_layers"],
            "num_key_value_heads": tiny["n_kv_heads"], "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
            "sliding_window": None, "vocab_size": 131072}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 10,
            "image_seq_length": 1, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
            "vision_feature_select_strategy": "full", "torch_dtype": "bfloat16", "text_config": text,
            "vision_config": vision}


def hf_config_large(tiny: dict) -> dict:
    """The HF layout of Pixtral-Large (transformers >= 4.51): ids repeated in the vision config."""
    v = tiny["vision_encoder"]
    text = {"model_type": "mistral", "hidden_size": tiny["dim"], "head_dim": tiny["head_dim"],
            "num_attention_heads": tiny["n_heads"], "intermediate_size": tiny["hidden_dim"],
            "max_position_embeddings": 131072, "num_hidden_layers": tiny["n_layers"],
            "num_key_value_heads": tiny["n_kv_heads"], "rms_norm_eps": 1e-05, "norm_eps": 1e-05,
            "rope_theta": 1000000000.0, "sliding_window": None, "vocab_size": 32768}
    vision = {"model_type": "pixtral", "head_dim": v["hidden_size"] // v["num_attention_heads"],
              "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
              "num_hidden_layers": v["num_hidden_layers"], "num_attention_heads": v["num_attention_heads"],
              "image_size": 1024, "patch_size": 16, "rope_theta": 10000.0, "hidden_act": "silu",
              "image_break_token_id": 14, "image_end_token_id": 15}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 10,
            "image_token_id": 10, "image_seq_length": 1, "multimodal_projector_bias": False,
            "projector_hidden_act": "gelu", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "transformers_version": "4.51.3", "text_config": text, "vision_config": vision}


def _with_config(src, dst, name: str, config: dict):
    shutil.copytree(src, dst)
    (dst / name).write_text(json.dumps(config, indent=2))
    return dst


def _logits(ckpt, **kw) -> torch.Tensor:
    return load_model(ckpt, with_vision_encoder=False, **kw).logits_no_cache(PROMPT)


@pytest.fixture(scope="module")
def reference_12b(mistral_12b) -> torch.Tensor:
    return _logits(mistral_12b)


def test_12b_params_both_releases(mistral_12b, reference_12b, tmp_path, caplog):
    tiny = _sizes(mistral_12b)
    current = _with_config(mistral_12b, tmp_path / "current", "params.json", params_12b(tiny, True))
    assert torch.equal(_logits(current), reference_12b)
    with caplog.at_level(logging.INFO, logger="model.config"):
        old = _with_config(mistral_12b, tmp_path / "old", "params.json", params_12b(tiny, False))
        v = load_model_args(old).vision_encoder
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id) == (10, 12, 13)
    assert "image_break_token_id, image_end_token_id: taken from the tokenizer tekken.json" in caplog.text
    assert load_model_args(old) == load_model_args(current)
    assert torch.equal(_logits(old), reference_12b)


def test_params_image_id_that_disagrees_with_the_tokenizer_is_named(mistral_12b, tmp_path):
    params = params_12b(_sizes(mistral_12b), False)
    params["vision_encoder"]["image_token_id"] = 11
    ckpt = _with_config(mistral_12b, tmp_path / "ckpt", "params.json", params)
    with pytest.raises(ValueError, match=r"image_token_id=11 but the tokenizer tekken\.json says 10"):
        load_model_args(ckpt)


def test_large_params(mistral_large, tmp_path):
    ckpt = _with_config(mistral_large, tmp_path / "ckpt", "params.json", params_large(_sizes(mistral_large)))
    args = load_model_args(ckpt)
    v = args.vision_encoder
    assert (v.image_token_id, v.image_break_token_id, v.image_end_token_id, v.adapter_bias) == (10, 14, 15, False)
    assert args.max_position_embeddings == TRAINED_CONTEXT
    assert torch.equal(_logits(ckpt), _logits(mistral_large))


def test_hf_12b_config_caps_the_declared_context(hf_12b, mistral_12b, reference_12b, tmp_path, caplog):
    ckpt = _with_config(hf_12b, tmp_path / "ckpt", "config.json", hf_config_12b(_sizes(mistral_12b)))
    with caplog.at_level(logging.WARNING, logger="model.config"):
        args = load_model_args(ckpt)
    assert args.max_position_embeddings == TRAINED_CONTEXT == 131072
    assert "says 1024000, more than the 131072 tokens Pixtral was trained on" in caplog.text
    assert engine_config_for(args, num_blocks=16384, eos_token_id=2).max_model_len == 131072
    assert args == load_model_args(mistral_12b)
    torch.testing.assert_close(_logits(ckpt), reference_12b, rtol=0, atol=1e-5)


def test_hf_vision_config_without_hidden_act_warns_and_uses_silu(hf_12b, mistral_12b, tmp_path, caplog):
    ckpt = _with_config(hf_12b, tmp_path / "ckpt", "config.json", hf_config_12b(_sizes(mistral_12b), None))
    with caplog.at_level(logging.WARNING, logger="model.config"):
        assert load_model_args(ckpt).vision_encoder.hidden_act == "silu"
    assert "no hidden_act: using silu" in caplog.text
    gelu = _with_config(hf_12b, tmp_path / "gelu", "config.json", hf_config_12b(_sizes(mistral_12b), "gelu"))
    assert load_model_args(gelu).vision_encoder.hidden_act == "gelu"  # the file is honoured when it says


def test_hf_large_config_repeats_ids_that_must_agree(hf_large, mistral_large, tmp_path):
    config = hf_config_large(_sizes(mistral_large))
    ckpt = _with_config(hf_large, tmp_path / "ckpt", "config.json", config)
    assert load_model_args(ckpt) == load_model_args(mistral_large)
    config["vision_config"]["image_end_token_id"] = 13  # the 12B id: a config for the wrong tokenizer
    wrong = _with_config(hf_large, tmp_path / "wrong", "config.json", config)
    with pytest.raises(ValueError, match=r"image_end_token_id=13 but the tokenizer tokenizer\.model\.v7m1 says 15"):
        load_model_args(wrong)


def test_a_smaller_declared_context_is_kept(mistral_12b, tmp_path):
    params = params_12b(_sizes(mistral_12b), True)
    params["max_seq_len"] = 32768
    ckpt = _with_config(mistral_12b, tmp_path / "ckpt", "params.json", params)
    assert load_model_args(ckpt).max_position_embeddings == 32768


def test_community_hf_repo_needs_and_takes_a_tokenizer_path(hf_12b, reference_12b, tmp_path):
    ckpt = tmp_path / "community"
    shutil.copytree(hf_12b, ckpt)
    tekken = tmp_path / "downloaded" / "tekken.json"
    tekken.parent.mkdir()
    shutil.move(ckpt / "tekken.json", tekken)
    with pytest.raises(FileNotFoundError, match=r"download tekken\.json from mistralai/Pixtral-12B-2409.*--tokenizer PATH"):
        load_model_args(ckpt)
    torch.testing.assert_close(_logits(ckpt, tokenizer=tekken), reference_12b, rtol=0, atol=1e-5)
    assert load_model_args(ckpt, tekken.parent) == load_model_args(hf_12b)  # a directory holding it works too
    with pytest.raises(FileNotFoundError, match="tokenizer .*nowhere.json does not exist"):
        load_model_args(ckpt, tmp_path / "nowhere.json")


@pytest.mark.parametrize("name, edit, message", [
    ("params.json", lambda c: c.pop("dim"), "params.json lacks dim"),
    ("params.json", lambda c: c["vision_encoder"].pop("patch_size"), "params.json vision_encoder lacks patch_size"),
])
def test_missing_params_field_is_named(mistral_12b, tmp_path, name, edit, message):
    params = params_12b(_sizes(mistral_12b), True)
    edit(params)
    ckpt = _with_config(mistral_12b, tmp_path / "ckpt", name, params)
    with pytest.raises(ValueError, match=message):
        load_model_args(ckpt)


def test_missing_hf_field_is_named(hf_12b, mistral_12b, tmp_path):
    config = hf_config_12b(_sizes(mistral_12b))
    del config["text_config"]["vocab_size"]
    ckpt = _with_config(hf_12b, tmp_path / "ckpt", "config.json", config)
    with pytest.raises(ValueError, match="config.json text_config lacks vocab_size"):
        load_model_args(ckpt)
