"""Tiny random-weight Pixtral checkpoints of the real architecture, with the real tokenizers.

    python -m model.tiny OUT_DIR --format mistral|hf --shape 12b|large [--set dim=1024 n_layers=8]

Nothing is downloaded: the tokenizers ship inside the mistral-common wheel. `12b` mirrors
Pixtral-12B (tekken, image ids 10/12/13, n_heads*head_dim != dim, adapter bias); `large` mirrors
Pixtral-Large (v7m1 sentencepiece, image ids 10/14/15, no adapter bias).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from model.config import ModelArgs, VisionEncoderArgs
from model.convert import write_hf, write_mistral


def tokenizer_path(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


SHAPES = {
    "12b": dict(
        tokenizer="tekken_240911.json",
        args=dict(dim=64, n_layers=2, head_dim=32, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                  vocab_size=131072, rope_theta=1e9),
        vision=dict(hidden_size=32, num_channels=3, max_image_size=1024, patch_size=16, rope_theta=10000.0,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_token_id=10,
                    image_break_token_id=12, image_end_token_id=13, adapter_bias=True),
    ),
    "large": dict(
        tokenizer="mistral_instruct_tokenizer_241114.model.v7m1",
        args=dict(dim=128, n_layers=2, head_dim=32, hidden_dim=256, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                  vocab_size=32768, rope_theta=1e9),
        vision=dict(hidden_size=48, num_channels=3, max_image_size=1024, patch_size=16, rope_theta=10000.0,
                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_token_id=10,
                    image_break_token_id=14, image_end_token_id=15, adapter_bias=False),
    ),
}


def tiny_args(shape: str, overrides: dict | None = None) -> ModelArgs:
    spec = SHAPES[shape]
    args, vision = dict(spec["args"]), dict(spec["vision"])
    for key, value in (overrides or {}).items():
        target = vision if key.startswith("vision.") else args
        target[key.removeprefix("vision.")] = value
    return ModelArgs(**args, vision_encoder=VisionEncoderArgs(**vision))


def random_state(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Weights scaled so activations and logits stay O(1): greedy choices are well separated."""
    from model.loader import checkpoint_shapes
    from model.pixtral import PixtralModel

    with torch.device("meta"):
        shapes = checkpoint_shapes(PixtralModel(args))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name == "tok_embeddings.weight":
            t = torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        state[name] = t
    return state


def random_model(args: ModelArgs, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                 with_vision_encoder: bool = True):
    """A model of `args` with random weights made on `device` (no checkpoint: for benchmarks and
    GPU checks at full size, where writing one would take longer than the run), scaled as
    `random_state` scales them."""
    from model.layers.fp8 import cast_model
    from model.layers.linear import pack_linear_weights
    from model.loader import frozen
    from model.pixtral import PixtralModel

    with torch.device("meta"):
        model = PixtralModel(args, with_vision_encoder=with_vision_encoder)
    cast_model(model, dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
                p.normal_(1.0, 0.1, generator=gen)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1, generator=gen)
            elif name == "tok_embeddings.weight" or p.dim() < 2:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=gen)
    pack_linear_weights(model)
    return frozen(model)


def make_tiny_checkpoint(out: str | Path, fmt: str = "mistral", shape: str = "12b", seed: int = 0,
                         overrides: dict | None = None, dtype: torch.dtype = torch.float32) -> Path:
    args = tiny_args(shape, overrides)
    state = {k: v.to(dtype) for k, v in random_state(args, seed).items()}
    writer = write_mistral if fmt == "mistral" else write_hf
    return writer(state, args, tokenizer_path(SHAPES[shape]["tokenizer"]), Path(out))


def _parse_value(text: str) -> int | float | bool | str:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", choices=["mistral", "hf"], default="mistral")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="12b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override a size, e.g. dim=1024 n_layers=8 vision.num_hidden_layers=4")
    ns = parser.parse_args()
    overrides = dict(kv.split("=", 1) for kv in ns.set)
    path = make_tiny_checkpoint(ns.out, ns.format, ns.shape, ns.seed,
                                {k: _parse_value(v) for k, v in overrides.items()}, getattr(torch, ns.dtype))
    print(path)


if __name__ == "__main__":
    main()
