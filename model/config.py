"""Model configuration: a tree of dataclasses read from a checkpoint directory.

Two on-disk formats describe the same architecture:
- Mistral format: `params.json` with a nested `vision_encoder` object.
- Hugging Face format: `config.json` of a `LlavaForConditionalGeneration` (Pixtral vision tower,
  Mistral text model).

Published files leave out some facts, and we take them from where they are reliable:
- HF configs, and Pixtral-12B `params.json` files from before December 2024, have no
  `[IMG_BREAK]`/`[IMG_END]` ids: they come from the mistral-common tokenizer.
- HF vision configs may lack `hidden_act`: the Pixtral ViT uses SiLU (transformers defaults to gelu).
- HF text configs of Mistral-Nemo-based models declare `max_position_embeddings: 1024000`, more
  than Pixtral was trained on: the context is capped at the trained 128k (model cards).
Community HF repos ship no mistral-common tokenizer; `tokenizer=PATH` points at one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MISTRAL_PARAMS = "params.json"
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v7m1", "tokenizer.model.v3", "tokenizer.model")
# Every Pixtral release is trained on a 128k-token context (Pixtral-12B-2409 and
# Pixtral-Large-Instruct-2411 model cards). A config that claims more is not trusted by default.
TRAINED_CONTEXT = 131072


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
    max_position_embeddings: int = TRAINED_CONTEXT  # the trained context: the default max_model_len
    quantization: str | None = None  # "fp8": decoder linear weights in FP8, one scale per output channel
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0, (self.n_heads, self.n_kv_heads)
        assert self.head_dim % 2 == 0, self.head_dim

    @property
    def is_multimodal(self) -> bool:
        return self.vision_encoder is not None


def load_model_args(checkpoint_dir: str | Path, tokenizer: str | Path | None = None) -> ModelArgs:
    """Read the model configuration from either checkpoint format; `tokenizer` overrides where the
    mistral-common tokenizer is found (needed only for facts the config leaves out)."""
    path = Path(checkpoint_dir)
    if (path / MISTRAL_PARAMS).exists():
        return args_from_params(json.loads((path / MISTRAL_PARAMS).read_text()),
                                lambda: find_tokenizer_file(path, tokenizer))
    if (path / HF_CONFIG).exists():
        return args_from_hf_config(json.loads((path / HF_CONFIG).read_text()), find_tokenizer_file(path, tokenizer))
    raise FileNotFoundError(f"{path} has neither {MISTRAL_PARAMS} (Mistral format) nor {HF_CONFIG} (Hugging Face format)")


def find_tokenizer_file(checkpoint_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """The mistral-common tokenizer of a checkpoint: `tokenizer` (a file, or a directory holding
    one) when given, else the one shipped beside the weights (tekken.json or a sentencepiece model)."""
    if tokenizer is not None:
        given = Path(tokenizer)
        if given.is_file():
            return given
        if not given.is_dir():
            raise FileNotFoundError(f"tokenizer {given} does not exist")
        return find_tokenizer_file(given)
    path = Path(checkpoint_dir)
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            return path / name
    candidates = sorted(path.glob("tokenizer.model.v*"))
    if candidates:
        return candidates[-1]
    raise FileNotFoundError(
        f"no mistral-common tokenizer in {path}: expected one of {', '.join(TOKENIZER_FILES)}. Community Hugging Face "
        "repos do not ship one: download tekken.json from mistralai/Pixtral-12B-2409 (for Pixtral-12B) or "
        "tokenizer.model.v7m1 from mistralai/Pixtral-Large-Instruct-2411 (for Pixtral-Large), and pass "
        "--tokenizer PATH (config field `tokenizer`)")


def args_from_params(params: dict, tokenizer_file: Callable[[], Path] | None = None) -> ModelArgs:
    """Mistral format: params.json keys map to fields one-to-one. `tokenizer_file` is asked only
    when the vision section lacks image token ids (12B files from before December 2024)."""
    params = dict(params)
    vision = params.pop("vision_encoder", None)
    known = ModelArgs.__dataclass_fields__
    kwargs = {k: v for k, v in params.items() if k in known and k not in ("vision_encoder", "extra")}
    kwargs.setdefault("rope_theta", 10000.0)
    if "dim" in params and "n_heads" in params:
        kwargs.setdefault("head_dim", params["dim"] // params["n_heads"])
    declared = params.get("max_seq_len", params.get("max_position_embeddings"))
    kwargs["max_position_embeddings"] = trained_context(declared, MISTRAL_PARAMS + " max_seq_len")
    extra = {k: v for k, v in params.items() if k not in known and k != "max_seq_len"}
    required = [f for f in ("dim", "n_layers", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size")
                if f not in kwargs]
    if required:
        raise ValueError(f"{MISTRAL_PARAMS} lacks {', '.join(required)}")
    return ModelArgs(**kwargs, vision_encoder=vision_args_from_params(vision, tokenizer_file) if vision else None,
                     extra=extra)


IMAGE_ID_FIELDS = ("image_token_id", "image_break_token_id", "image_end_token_id")


def vision_args_from_params(vision: dict, tokenizer_file: Callable[[], Path] | None = None) -> VisionEncoderArgs:
    vision = dict(vision)
    # Pixtral-12B names the size `image_size`, Pixtral-Large both: they mean the longest side.
    vision.setdefault("max_image_size", vision.get("image_size", 1024))
    absent = [k for k in IMAGE_ID_FIELDS if k not in vision]
    if absent:
        if tokenizer_file is None:
            raise ValueError(f"{MISTRAL_PARAMS} vision_encoder lacks {absent} and no tokenizer was given")
        source = tokenizer_file()
        ids = dict(zip(IMAGE_ID_FIELDS, image_token_ids_from_tokenizer(source)))
        for key in IMAGE_ID_FIELDS:
            if key in vision and vision[key] != ids[key]:
                raise ValueError(f"{MISTRAL_PARAMS} {key}={vision[key]} but the tokenizer {source.name} says {ids[key]}")
        log.info("%s has no %s: taken from the tokenizer %s", MISTRAL_PARAMS, ", ".join(absent), source.name)
        vision.update(ids)
    fields = VisionEncoderArgs.__dataclass_fields__
    lacking = [k for k, f in fields.items() if k not in vision and f.default is dataclasses.MISSING]
    if lacking:
        raise ValueError(f"{MISTRAL_PARAMS} vision_encoder lacks {', '.join(lacking)}")
    return VisionEncoderArgs(**{k: v for k, v in vision.items() if k in fields})


def trained_context(declared: int | None, source: str) -> int:
    """The context length to serve by default: what the config declares, at most the trained 128k."""
    if declared is None:
        return TRAINED_CONTEXT
    if declared > TRAINED_CONTEXT:
        log.warning("%s says %d, more than the %d tokens Pixtral was trained on: using %d by default "
                    "(set max_model_len to serve longer contexts)", source, declared, TRAINED_CONTEXT, TRAINED_CONTEXT)
        return TRAINED_CONTEXT
    return int(declared)


def _rope_theta(cfg: dict, default: float) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return float((cfg.get("rope_parameters") or {}).get("rope_theta", default))


def args_from_hf_config(config: dict, tokenizer_file: Path) -> ModelArgs:
    """Hugging Face Llava format. Image token ids come from the tokenizer (the config may repeat
    them, and must then agree); a missing size is an error that names its field."""
    arch = config.get("architectures") or ["LlavaForConditionalGeneration"]
    if arch[0] != "LlavaForConditionalGeneration":
        raise ValueError(f"config.json architectures {arch}: only LlavaForConditionalGeneration (Pixtral) is supported")
    layer = config.get("vision_feature_layer", -1)
    strategy = config.get("vision_feature_select_strategy", "full")
    if layer != -1 or strategy != "full":
        raise ValueError(f"Pixtral uses the last vision layer with all patches; got layer={layer}, strategy={strategy}")
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json projector_hidden_act {config['projector_hidden_act']!r}: Pixtral's adapter is gelu")
    text, vis = _section(config, "text_config"), _section(config, "vision_config")
    ids = dict(zip(IMAGE_ID_FIELDS, image_token_ids_from_tokenizer(tokenizer_file)))
    stated = {"image_token_id": config.get("image_token_index", config.get("image_token_id")),
              "image_break_token_id": vis.get("image_break_token_id"), "image_end_token_id": vis.get("image_end_token_id")}
    for key, value in stated.items():
        if value is not None and value != ids[key]:
            raise ValueError(f"config.json {key}={value} but the tokenizer {tokenizer_file.name} says {ids[key]}")
    n_heads = _field(text, "num_attention_heads", "text_config")
    vision = VisionEncoderArgs(
        hidden_size=_field(vis, "hidden_size", "vision_config", 1024),
        num_channels=vis.get("num_channels", 3),
        max_image_size=vis.get("image_size", 1024),
        patch_size=vis.get("patch_size", 16),
        rope_theta=_rope_theta(vis, 10000.0),
        intermediate_size=_field(vis, "intermediate_size", "vision_config", 4096),
        num_hidden_layers=_field(vis, "num_hidden_layers", "vision_config", 24),
        num_attention_heads=_field(vis, "num_attention_heads", "vision_config", 16),
        adapter_bias=config.get("multimodal_projector_bias", True),
        hidden_act=_vision_act(vis),
        **ids,
    )
    dim = _field(text, "hidden_size", "text_config")
    return ModelArgs(
        dim=dim,
        n_layers=_field(text, "num_hidden_layers", "text_config"),
        head_dim=text.get("head_dim") or dim // n_heads,
        hidden_dim=_field(text, "intermediate_size", "text_config"),
        n_heads=n_heads,
        n_kv_heads=text.get("num_key_value_heads", n_heads),
        norm_eps=text.get("rms_norm_eps", 1e-5),
        vocab_size=_field(text, "vocab_size", "text_config"),
        rope_theta=_rope_theta(text, 10000.0),
        vision_encoder=vision,
        max_position_embeddings=trained_context(text.get("max_position_embeddings"),
                                                "config.json text_config.max_position_embeddings"),
        quantization=quantization_from_hf(config.get("quantization_config")),
    )


def quantization_from_hf(q: dict | None) -> str | None:
    """The one quantized format we load: compressed-tensors FP8 with per-channel weight scales and
    dynamic per-token activations (llm-compressor's FP8_DYNAMIC, the published FP8 Pixtral
    conversions), leaving lm_head, the vision tower and the projector unquantized. Anything else
    is refused with the field at fault."""
    if not q:
        return None
    where = "config.json quantization_config"
    if q.get("quant_method") != "compressed-tensors" or q.get("format", "float-quantized") != "float-quantized":
        raise ValueError(f"{where}: quant_method {q.get('quant_method')!r}, format {q.get('format')!r}: only "
                         "compressed-tensors FP8 (float-quantized) checkpoints load")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"{where}.config_groups has {len(groups)} groups: FP8 checkpoints have one")
    (name, group), = groups.items()
    weights = group.get("weights") or {}
    expected = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True}
    wrong = {k: weights.get(k) for k, v in expected.items() if weights.get(k) != v}
    if wrong or weights.get("dynamic", False):
        raise ValueError(f"{where}.config_groups.{name}.weights {wrong or weights}: only static FP8 weights with "
                         "one scale per output channel load")
    acts = group.get("input_activations")
    if acts and not (acts.get("num_bits") == 8 and acts.get("type") == "float" and acts.get("dynamic")):
        raise ValueError(f"{where}.config_groups.{name}.input_activations {acts}: only dynamic FP8 activations load")
    if q.get("kv_cache_scheme"):
        raise ValueError(f"{where}.kv_cache_scheme {q['kv_cache_scheme']}: an FP8 KV cache is not supported")
    ignored = " ".join(q.get("ignore") or [])
    for module in ("lm_head", "vision_tower", "multi_modal_projector"):
        if module not in ignored:
            raise ValueError(f"{where}.ignore does not list {module}: only the decoder's linear layers may be FP8")
    return "fp8"


def _section(config: dict, key: str) -> dict:
    if not isinstance(config.get(key), dict):
        raise ValueError(f"config.json has no {key} object")
    return config[key]


_REQUIRED = object()


def _field(section: dict, key: str, where: str, default=_REQUIRED):
    """A value from a config section; the sizes the model cannot guess (the text model's) are
    required, and a missing one is named."""
    if key in section:
        return section[key]
    if default is _REQUIRED:
        raise ValueError(f"config.json {where} lacks {key}")
    return default


def _vision_act(vis: dict) -> str:
    """The file is the truth when it says; without it, SiLU as in the reference Pixtral ViT
    (transformers' own default, gelu, would silently change every image feature)."""
    if "hidden_act" in vis:
        return vis["hidden_act"]
    log.warning("config.json vision_config has no hidden_act: using silu, the Pixtral vision encoder's activation")
    return "silu"


def image_token_ids_from_tokenizer(tokenizer_file: Path) -> tuple[int, int, int]:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    encoder = MistralTokenizer.from_file(str(tokenizer_file)).instruct_tokenizer.image_encoder
    if encoder is None:
        raise ValueError(f"the tokenizer {tokenizer_file} has no image support: Pixtral needs its own tokenizer")
    ids = encoder.special_ids
    return ids.img, ids.img_break, ids.img_end
