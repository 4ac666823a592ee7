"""Model configuration: a tree of dataclasses read from a checkpoint directory.

Two on-disk formats describe the same architecture:
- Mistral format: `params.json` with a nested `vision_encoder` object.
- Hugging Face format: `config.json` of a `LlavaForConditionalGeneration` (Pixtral vision tower,
  Mistral text model). HF does not store the `[IMG_BREAK]`/`[IMG_END]` ids; they come from the
  mistral-common tokenizer shipped beside the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MISTRAL_PARAMS = "params.json"
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v3", "tokenizer.model")


@dataclass
class VisionEncoderArgs:
    hidden_size: int
    num_channels: int
    max_image_size: int
    patch_size: int
    rope_theta: float
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_token_id: int
    image_break_token_id: int
    image_end_token_id: int
    adapter_bias: bool = True
    hidden_act: str = "silu"
    spatial_merge_size: int = 1
    add_pre_mm_projector_layer_norm: bool = False
    mm_projector_id: str = ""

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, (self.hidden_size, self.num_attention_heads)
        assert self.head_dim % 4 == 0, f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}"
        assert self.hidden_act in ("silu", "gelu"), self.hidden_act
        assert self.mm_projector_id in ("", "patch_merge"), self.mm_projector_id
        if self.mm_projector_id == "patch_merge":
            assert self.spatial_merge_size > 1, self.spatial_merge_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def uses_patch_merger(self) -> bool:
        return self.mm_projector_id == "patch_merge"


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float
    vision_encoder: VisionEncoderArgs | None = None
    max_position_embeddings: int = 131072
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0, (self.n_heads, self.n_kv_heads)
        assert self.head_dim % 2 == 0, self.head_dim

    @property
    def is_multimodal(self) -> bool:
        return self.vision_encoder is not None


def load_model_args(checkpoint_dir: str | Path) -> ModelArgs:
    """Read the model configuration from either checkpoint format."""
    path = Path(checkpoint_dir)
    if (path / MISTRAL_PARAMS).exists():
        return args_from_params(json.loads((path / MISTRAL_PARAMS).read_text()))
    if (path / HF_CONFIG).exists():
        return args_from_hf_config(json.loads((path / HF_CONFIG).read_text()), find_tokenizer_file(path))
    raise FileNotFoundError(f"{path} has neither {MISTRAL_PARAMS} (Mistral format) nor {HF_CONFIG} (Hugging Face format)")


def find_tokenizer_file(checkpoint_dir: str | Path) -> Path:
    """The mistral-common tokenizer shipped with a checkpoint (tekken.json or a sentencepiece model)."""
    path = Path(checkpoint_dir)
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            return path / name
    candidates = sorted(path.glob("tokenizer.model.v*"))
    if candidates:
        return candidates[-1]
    raise FileNotFoundError(f"no mistral-common tokenizer in {path}: expected one of {TOKENIZER_FILES}")


def args_from_params(params: dict) -> ModelArgs:
    """Mistral format: params.json keys map to fields one-to-one."""
    params = dict(params)
    vision = params.pop("vision_encoder", None)
    known = ModelArgs.__dataclass_fields__
    kwargs = {k: v for k, v in params.items() if k in known and k not in ("vision_encoder", "extra")}
    kwargs.setdefault("rope_theta", 10000.0)
    kwargs.setdefault("head_dim", params["dim"] // params["n_heads"])
    if "max_seq_len" in params:
        kwargs["max_position_embeddings"] = params["max_seq_len"]
    extra = {k: v for k, v in params.items() if k not in known}
    return ModelArgs(**kwargs, vision_encoder=vision_args_from_params(vision) if vision else None, extra=extra)


def vision_args_from_params(vision: dict) -> VisionEncoderArgs:
    vision = dict(vision)
    # Pixtral-12B names the size `image_size`, Pixtral-Large both: they mean the longest side.
    vision.setdefault("max_image_size", vision.get("image_size", 1024))
    known = VisionEncoderArgs.__dataclass_fields__
    return VisionEncoderArgs(**{k: v for k, v in vision.items() if k in known})


def _rope_theta(cfg: dict, default: float) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", default))


def args_from_hf_config(config: dict, tokenizer_file: Path) -> ModelArgs:
    """Hugging Face Llava format; break/end image ids are read from the tokenizer."""
    arch = config.get("architectures") or ["LlavaForConditionalGeneration"]
    assert arch[0] == "LlavaForConditionalGeneration", f"unsupported architecture {arch}"
    layer = config.get("vision_feature_layer", -1)
    strategy = config.get("vision_feature_select_strategy", "full")
    if layer != -1 or strategy != "full":
        raise ValueError(f"Pixtral uses the last vision layer with all patches; got layer={layer}, strategy={strategy}")
    text, vis = config["text_config"], config["vision_config"]
    img, brk, end = image_token_ids_from_tokenizer(tokenizer_file)
    image_token = config.get("image_token_index", config.get("image_token_id", img))
    assert image_token == img, f"config image token {image_token} != tokenizer [IMG] {img}"
    n_heads = text.get("num_attention_heads", 32)
    vision = VisionEncoderArgs(
        hidden_size=vis.get("hidden_size", 1024),
        num_channels=vis.get("num_channels", 3),
        max_image_size=vis.get("image_size", 1024),
        patch_size=vis.get("patch_size", 16),
        rope_theta=_rope_theta(vis, 10000.0),
        intermediate_size=vis.get("intermediate_size", 4096),
        num_hidden_layers=vis.get("num_hidden_layers", 24),
        num_attention_heads=vis.get("num_attention_heads", 16),
        image_token_id=img,
        image_break_token_id=brk,
        image_end_token_id=end,
        adapter_bias=config.get("multimodal_projector_bias", True),
        # transformers' PixtralVisionConfig defaults to gelu; the file is the truth.
        hidden_act=vis.get("hidden_act", "gelu"),
    )
    assert config.get("projector_hidden_act", "gelu") == "gelu", config.get("projector_hidden_act")
    return ModelArgs(
        dim=text["hidden_size"],
        n_layers=text["num_hidden_layers"],
        head_dim=text.get("head_dim") or text["hidden_size"] // n_heads,
        hidden_dim=text["intermediate_size"],
        n_heads=n_heads,
        n_kv_heads=text.get("num_key_value_heads", n_heads),
        norm_eps=text.get("rms_norm_eps", 1e-5),
        vocab_size=text["vocab_size"],
        rope_theta=_rope_theta(text, 10000.0),
        vision_encoder=vision,
        max_position_embeddings=text.get("max_position_embeddings", 131072),
    )


def image_token_ids_from_tokenizer(tokenizer_file: Path) -> tuple[int, int, int]:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    encoder = MistralTokenizer.from_file(str(tokenizer_file)).instruct_tokenizer.image_encoder
    assert encoder is not None, f"{tokenizer_file} has no image support"
    ids = encoder.special_ids
    return ids.img, ids.img_break, ids.img_end
