"""Write checkpoints in either format, and convert between them.

    python -m model.convert SRC_DIR DST_DIR         # Mistral <-> Hugging Face, whichever SRC is not
    python -m model.convert SRC_DIR DST_DIR --fp8   # HF layout, decoder weights in FP8 (FP8-dynamic)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import MISTRAL_PARAMS, ModelArgs, find_tokenizer_file, load_model_args
from model.layers.fp8 import quantize_per_channel
from model.loader import iter_checkpoint, mistral_to_hf_name, permute_for_hf, rope_heads


def params_json(args: ModelArgs) -> dict:
    params = {k: v for k, v in dataclasses.asdict(args).items()
              if k not in ("vision_encoder", "extra", "max_position_embeddings")}
    params["max_seq_len"] = args.max_position_embeddings  # the name Mistral's files use
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


# decoder linear weights: the ones FP8_DYNAMIC quantises (lm_head, vision tower and projector stay bf16)
FP8_WEIGHTS = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")


def fp8_config(ignore: list[str]) -> dict:
    """compressed-tensors' description of FP8_DYNAMIC, as llm-compressor writes it."""
    weights = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
               "observer_kwargs": {}}
    activations = {**weights, "strategy": "token", "dynamic": True, "observer": None}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "kv_cache_scheme": None, "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": activations, "output_activations": None}}}


def write_hf_fp8(state: dict[str, torch.Tensor], args: ModelArgs, tokenizer: Path, out: Path) -> Path:
    """The HF Llava layout of an FP8-dynamic conversion: decoder linear weights in FP8 with a bf16
    scale per output channel, everything else in bf16."""
    quantized = {}
    for name, t in state.items():
        if FP8_WEIGHTS.fullmatch(name):
            quantized[name], quantized[name + "_scale"] = quantize_per_channel(t, torch.bfloat16)
        else:
            quantized[name] = t.to(torch.bfloat16)
    write_hf(quantized, args, tokenizer, out)
    config = json.loads((out / "config.json").read_text())
    # the ignore list of llm-compressor's Pixtral recipe
    ignore = ["language_model.lm_head", "re:vision_tower.*", "re:multi_modal_projector.*"]
    config.update(torch_dtype="bfloat16", quantization_config=fp8_config(ignore))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def convert(src: str | Path, dst: str | Path, tokenizer: str | Path | None = None, fp8: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    args = load_model_args(src, tokenizer)
    if args.quantization:
        raise ValueError(f"{src} is already quantized ({args.quantization}): convert its original weights")
    state = dict(iter_checkpoint(src, args))
    if fp8:
        writer = write_hf_fp8
    else:
        writer = write_hf if (src / MISTRAL_PARAMS).exists() else write_mistral
    return writer(state, args, find_tokenizer_file(src, tokenizer), dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="mistral-common tokenizer, if SRC ships none")
    parser.add_argument("--fp8", action="store_true",
                        help="write the HF layout with FP8 decoder weights (FP8-dynamic, per-channel scales)")
    ns = parser.parse_args()
    print(convert(ns.src, ns.dst, ns.tokenizer, ns.fp8))


if __name__ == "__main__":
    main()
