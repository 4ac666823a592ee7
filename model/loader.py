"""Load either checkpoint format into a PixtralModel.

Build on the meta device (no memory), allocate directly in the requested dtype and device, then
stream every tensor from memory-mapped safetensors files into its parameter. A parallel layer's
`weight_loader` cuts its own tensor-parallel shard. Every parameter must be loaded exactly once and
every checkpoint tensor must be used: anything else is an error that names the tensor.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import MISTRAL_PARAMS, ModelArgs, load_model_args
from model.layers.linear import MergedColumnParallelLinear, copy_checked, pack_linear_weights
from model.parallel import SINGLE, ParallelContext
from model.pixtral import PixtralModel
from model.vision_encoder import VisionEncoder

log = logging.getLogger(__name__)

# Mistral-format module path <-> Hugging Face (legacy Llava layout) module path; `*` is a layer index.
RENAMES = [
    ("tok_embeddings", "language_model.model.embed_tokens"),
    ("norm", "language_model.model.norm"),
    ("output", "language_model.lm_head"),
    ("layers.*.attention.wq", "language_model.model.layers.*.self_attn.q_proj"),
    ("layers.*.attention.wk", "language_model.model.layers.*.self_attn.k_proj"),
    ("layers.*.attention.wv", "language_model.model.layers.*.self_attn.v_proj"),
    ("layers.*.attention.wo", "language_model.model.layers.*.self_attn.o_proj"),
    ("layers.*.feed_forward.w1", "language_model.model.layers.*.mlp.gate_proj"),
    ("layers.*.feed_forward.w2", "language_model.model.layers.*.mlp.down_proj"),
    ("layers.*.feed_forward.w3", "language_model.model.layers.*.mlp.up_proj"),
    ("layers.*.attention_norm", "language_model.model.layers.*.input_layernorm"),
    ("layers.*.ffn_norm", "language_model.model.layers.*.post_attention_layernorm"),
    ("vision_encoder.patch_conv", "vision_tower.patch_conv"),
    ("vision_encoder.ln_pre", "vision_tower.ln_pre"),
    ("vision_encoder.transformer.layers.*.attention.wq", "vision_tower.transformer.layers.*.attention.q_proj"),
    ("vision_encoder.transformer.layers.*.attention.wk", "vision_tower.transformer.layers.*.attention.k_proj"),
    ("vision_encoder.transformer.layers.*.attention.wv", "vision_tower.transformer.layers.*.attention.v_proj"),
    ("vision_encoder.transformer.layers.*.attention.wo", "vision_tower.transformer.layers.*.attention.o_proj"),
    ("vision_encoder.transformer.layers.*.feed_forward.w1", "vision_tower.transformer.layers.*.feed_forward.gate_proj"),
    ("vision_encoder.transformer.layers.*.feed_forward.w2", "vision_tower.transformer.layers.*.feed_forward.down_proj"),
    ("vision_encoder.transformer.layers.*.feed_forward.w3", "vision_tower.transformer.layers.*.feed_forward.up_proj"),
    ("vision_encoder.transformer.layers.*.attention_norm", "vision_tower.transformer.layers.*.attention_norm"),
    ("vision_encoder.transformer.layers.*.ffn_norm", "vision_tower.transformer.layers.*.ffn_norm"),
    ("vision_language_adapter.w_in", "multi_modal_projector.linear_1"),
    ("vision_language_adapter.w_out", "multi_modal_projector.linear_2"),
    ("pre_mm_projector_norm", "multi_modal_projector.norm"),
    ("patch_merger.merging_layer", "multi_modal_projector.patch_merger.merging_layer"),
]
# transformers >= 4.52 saves Llava under `model.`; map it back to the legacy layout first.
HF_PREFIXES = [
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]
HF_IGNORED = re.compile(r"rotary_emb\.inv_freq|patch_positional_embedding")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")


_TO_MISTRAL = [(_compile(hf), mistral) for mistral, hf in RENAMES]
_TO_HF = [(_compile(mistral), hf) for mistral, hf in RENAMES]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    module, _, leaf = name.rpartition(".")
    for pattern, target in table:
        m = pattern.match(module)
        if m:
            for index in m.groups():
                target = target.replace("*", index, 1)
            return f"{target}.{leaf}"
    return None


def hf_to_mistral_name(name: str) -> str | None:
    for new, legacy in HF_PREFIXES:
        if name.startswith(new):
            name = legacy + name[len(new):]
            break
    return _rename(name, _TO_MISTRAL)


def mistral_to_hf_name(name: str) -> str:
    hf = _rename(name, _TO_HF)
    assert hf is not None, f"no Hugging Face name for {name}"
    return hf


def rope_heads(name: str, args: ModelArgs) -> int | None:
    """Number of heads of a q/k projection (Mistral name), whose rows HF stores permuted."""
    if re.fullmatch(r"layers\.\d+\.attention\.wq\.weight", name):
        return args.n_heads
    if re.fullmatch(r"layers\.\d+\.attention\.wk\.weight", name):
        return args.n_kv_heads
    if re.fullmatch(r"vision_encoder\.transformer\.layers\.\d+\.attention\.w[qk]\.weight", name):
        return args.vision_encoder.num_attention_heads
    return None


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> Mistral interleaved-pair row order."""
    d_out, d_in = w.shape
    return w.view(n_heads, 2, d_out // n_heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral interleaved-pair row order -> HF rotate-half row order (inverse of the above)."""
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def checkpoint_files(checkpoint_dir: Path) -> tuple[str, list[Path]]:
    """('mistral' | 'hf', safetensors files)."""
    if (checkpoint_dir / MISTRAL_PARAMS).exists():
        files = sorted(checkpoint_dir.glob("consolidated*.safetensors"))
        fmt = "mistral"
    else:
        index = checkpoint_dir / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [checkpoint_dir / n for n in names]
        else:
            files = sorted(checkpoint_dir.glob("model*.safetensors"))
        fmt = "hf"
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {checkpoint_dir}")
    return fmt, files


def iter_checkpoint(checkpoint_dir: Path, args: ModelArgs,
                    wanted: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, torch.Tensor, int]]:
    """Yield (mistral name, tensor, bytes) for every wanted tensor, in Mistral layout, memory-mapped.

    Unwanted tensors are never read (a vision replica skips the decoder's gigabytes)."""
    fmt, files = checkpoint_files(checkpoint_dir)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if fmt == "hf" and HF_IGNORED.search(key):
                    continue
                name = key if fmt == "mistral" else hf_to_mistral_name(key)
                if name is None:
                    raise KeyError(f"checkpoint tensor {key} ({path.name}) has no place in the Pixtral model")
                if not wanted(name):
                    continue
                tensor = f.get_tensor(key)
                heads = rope_heads(name, args) if fmt == "hf" else None
                yield name, (unpermute_from_hf(tensor, heads) if heads else tensor), tensor.numel() * tensor.element_size()


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               tp: ParallelContext = SINGLE, with_vision_encoder: bool = True) -> PixtralModel:
    checkpoint_dir = Path(checkpoint_dir)
    args = load_model_args(checkpoint_dir)
    with torch.device("meta"):
        model = PixtralModel(args, tp, with_vision_encoder=with_vision_encoder)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    load_weights(model, checkpoint_dir)
    pack_linear_weights(model)  # CPU only; after the last change to the weights
    return model.eval()


def load_vision_encoder(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """Only the vision encoder, for the vision pool: the decoder's tensors are never read."""
    checkpoint_dir = Path(checkpoint_dir)
    args = load_model_args(checkpoint_dir)
    assert args.vision_encoder is not None, f"{checkpoint_dir} has no vision encoder"
    with torch.device("meta"):
        encoder = VisionEncoder(args.vision_encoder)
    encoder.to(dtype=dtype)
    encoder.to_empty(device=device)
    prefix = "vision_encoder."
    _load_into(encoder, iter_checkpoint(checkpoint_dir, args, lambda n: n.startswith(prefix)), checkpoint_dir, prefix)
    pack_linear_weights(encoder)
    return encoder.eval()


def load_weights(model: PixtralModel, checkpoint_dir: Path) -> None:
    # decoder replicas leave the encoder to the vision pool
    skip_vision = model.vision_encoder is None
    wanted = (lambda n: not n.startswith("vision_encoder.")) if skip_vision else (lambda n: True)
    _load_into(model, iter_checkpoint(checkpoint_dir, model.args, wanted), checkpoint_dir)


def checkpoint_layout(model: torch.nn.Module) -> dict[str, tuple[str, int | None]]:
    """Checkpoint tensor name -> (parameter name, part index for merged layers, else None)."""
    layout = {}
    for pname, _ in model.named_parameters():
        owner_name, _, leaf = pname.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, MergedColumnParallelLinear):
            parent = owner_name.rpartition(".")[0]
            for part, short in enumerate(owner.part_names):
                layout[f"{parent}.{short}.{leaf}".lstrip(".")] = (pname, part)
        else:
            layout[pname] = (pname, None)
    return layout


def checkpoint_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every checkpoint tensor the model expects."""
    shapes = {}
    for name, (pname, part) in checkpoint_layout(model).items():
        param = model.get_parameter(pname)
        if part is None:
            shapes[name] = tuple(param.shape)
        else:
            owner = model.get_submodule(pname.rpartition(".")[0])
            shapes[name] = (owner.full_sizes[part], *param.shape[1:])
    return shapes


def _load_into(model: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor, int]], checkpoint_dir: Path,
               prefix: str = "") -> None:
    layout = checkpoint_layout(model)
    loaded: set[str] = set()
    total = sum(p.stat().st_size for p in checkpoint_files(checkpoint_dir)[1])
    progress = _Progress(total, checkpoint_dir)
    for full_name, tensor, nbytes in tensors:
        progress.advance(nbytes)
        name = full_name.removeprefix(prefix)
        if name not in layout:
            raise KeyError(f"checkpoint tensor {full_name} has no parameter in the model (wrong config?)")
        if name in loaded:
            raise KeyError(f"checkpoint tensor {full_name} appears twice")
        pname, part = layout[name]
        param = model.get_parameter(pname)
        # Parallel layers cut their own shard; everything else is replicated whole.
        owner = model.get_submodule(pname.rpartition(".")[0])
        with torch.no_grad():
            if part is not None:
                owner.weight_loader(param, tensor, full_name, part)
            elif hasattr(owner, "weight_loader"):
                owner.weight_loader(param, tensor, full_name)
            else:
                copy_checked(param, tensor, full_name)
        loaded.add(name)
    missing = sorted(prefix + n for n in set(layout) - loaded)
    if missing:
        raise KeyError(f"checkpoint {checkpoint_dir} lacks {len(missing)} tensors, first: {missing[:5]}")
    progress.done()


class _Progress:
    """Logs how much of a checkpoint has been read, at most every few seconds."""

    def __init__(self, total_bytes: int, where: Path) -> None:
        self.total, self.done_bytes, self.where = max(total_bytes, 1), 0, where
        self.start = self.last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self.last > 5:
            self.last = now
            log.info("loading %s: %.0f%% of %.1f GB", self.where, 100 * self.done_bytes / self.total, self.total / 1e9)

    def done(self) -> None:
        log.info("loaded %s (%.2f GB) in %.1fs", self.where, self.total / 1e9, time.monotonic() - self.start)
