"""Write checkpoints in either format, and convert between them.

    python -m model.convert SRC_DIR DST_DIR     # Mistral <-> Hugging Face, whichever SRC is not
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import MISTRAL_PARAMS, ModelArgs, find_tokenizer_file, load_model_args
from model.loader import iter_checkpoint, mistral_to_hf_name, permute_for_hf, rope_heads


def params_json(args: ModelArgs) -> dict:
    params = {k: v for k, v in dataclasses.asdict(args).items() if k not in ("vision_encoder", "extra")}
    if args.vision_encoder is not None:
        vision = dataclasses.asdict(args.vision_encoder)
        vision["image_size"] = vision["max_image_size"]
        params["vision_encoder"] = vision
    return params


def hf_config_json(args: ModelArgs) -> dict:
    v = args.vision_encoder
    assert v is not None and not v.uses_patch_merger and not v.add_pre_mm_projector_layer_norm, \
        "only Pixtral (Llava) checkpoints have a Hugging Face Llava layout"
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": v.image_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": v.adapter_bias,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "mistral",
            "hidden_size": args.dim,
            "num_hidden_layers": args.n_layers,
            "head_dim": args.head_dim,
            "intermediate_size": args.hidden_dim,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.n_kv_heads,
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "vocab_size": args.vocab_size,
            "max_position_embeddings": args.max_position_embeddings,
            "sliding_window": None,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": v.hidden_size,
            "num_channels": v.num_channels,
            "image_size": v.max_image_size,
            "patch_size": v.patch_size,
            "rope_theta": v.rope_theta,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "head_dim": v.head_dim,
            "hidden_act": v.hidden_act,
        },
    }


def tokenizer_name(tokenizer: Path) -> str:
    """The file name mistral-common checkpoints use: tekken.json or tokenizer.model.vN[m1]."""
    if tokenizer.suffix == ".json":
        return "tekken.json"
    return "tokenizer.model." + tokenizer.name.rsplit(".model.", 1)[-1]


def write_mistral(state: dict[str, torch.Tensor], args: ModelArgs, tokenizer: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in state.items()}, str(out / "consolidated.safetensors"))
    (out / MISTRAL_PARAMS).write_text(json.dumps(params_json(args), indent=2))
    shutil.copy(tokenizer, out / tokenizer_name(tokenizer))
    return out


def write_hf(state: dict[str, torch.Tensor], args: ModelArgs, tokenizer: Path, out: Path, shards: int = 2) -> Path:
    """HF Llava layout, q/k rows permuted to rotate-half, sharded with an index like large repos."""
    out.mkdir(parents=True, exist_ok=True)
    hf = {}
    for name, t in state.items():
        heads = rope_heads(name, args)
        hf[mistral_to_hf_name(name)] = (permute_for_hf(t, heads) if heads else t).contiguous()
    names = sorted(hf)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: hf[n] for n in part}, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in hf.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config_json(args), indent=2))
    shutil.copy(tokenizer, out / tokenizer_name(tokenizer))  # serving tokenizes with mistral-common
    return out


def convert(src: str | Path, dst: str | Path) -> Path:
    src, dst = Path(src), Path(dst)
    args = load_model_args(src)
    state = {name: t for name, t, _ in iter_checkpoint(src, args)}
    writer = write_hf if (src / MISTRAL_PARAMS).exists() else write_mistral
    return writer(state, args, find_tokenizer_file(src), dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    ns = parser.parse_args()
    print(convert(ns.src, ns.dst))


if __name__ == "__main__":
    main()
