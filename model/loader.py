"""Load either checkpoint format into a PixtralModel.

Build on the meta device (no memory) and match the checkpoint's headers against it first: every
tensor's full shape is checked before anything is read, and every parameter must be loaded exactly
once from a checkpoint tensor that the model uses (anything else is an error naming the tensors).
Then allocate in the requested dtype and device and read, from memory-mapped safetensors files,
only this rank's shard of each tensor (a parallel layer's `shard_of` says which).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from model.config import MISTRAL_PARAMS, ModelArgs, load_model_args
from model.layers.fp8 import cast_model
from model.layers.linear import MergedColumnParallelLinear, pack_linear_weights
from model.parallel import SINGLE, ParallelContext, Shard
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
    # an FP8 weight's per-row scales are permuted with its rows
    if re.fullmatch(r"layers\.\d+\.attention\.wq\.weight(_scale)?", name):
        return args.n_heads
    if re.fullmatch(r"layers\.\d+\.attention\.wk\.weight(_scale)?", name):
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


def iter_checkpoint(checkpoint_dir: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Mistral name, whole tensor in Mistral layout) for every tensor of a checkpoint (for
    conversion; serving loads through `load_model`, which reads only each rank's shard)."""
    fmt, files = checkpoint_files(checkpoint_dir)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = _mistral_name(fmt, key, path)
                if name is not None:
                    heads = rope_heads(name, args) if fmt == "hf" else None
                    tensor = f.get_tensor(key)
                    yield name, (unpermute_from_hf(tensor, heads) if heads else tensor)


def _mistral_name(fmt: str, key: str, path: Path) -> str | None:
    """A checkpoint key in Mistral naming; None for HF buffers we recompute (rotary tables)."""
    if fmt == "mistral":
        return key
    if HF_IGNORED.search(key):
        return None
    name = hf_to_mistral_name(key)
    if name is None:
        raise CheckpointError(f"checkpoint tensor {key} ({path.name}) has no place in the Pixtral model")
    return name


class CheckpointError(ValueError):
    """The checkpoint does not fit the model its config describes; the message names the tensors."""


# bytes per element of safetensors' dtype names (header only: nothing is read to learn them)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class TensorRead:
    """One checkpoint tensor, as this process will read it."""

    path: Path
    key: str  # name in the file
    name: str  # Mistral name
    target: torch.Tensor  # where it goes: a parameter, or this part's rows of a merged one
    shard: Shard | None  # None: read whole
    rope_heads: int | None  # HF q/k: heads in the full tensor, whose rows to un-permute
    nbytes: int  # bytes this process reads

    def read(self, f) -> torch.Tensor:
        if self.shard is None:
            tensor = f.get_tensor(self.key)
        else:
            # get_slice copies only this range out of the memory map: a row-parallel shard is a
            # strided column block, read row by row, never the whole tensor
            lo, hi = self.shard.start, self.shard.start + self.shard.size
            sliced = f.get_slice(self.key)
            tensor = sliced[lo:hi] if self.shard.dim == 0 else sliced[:, lo:hi]
        if self.rope_heads:
            # shards hold whole heads, and HF permutes rows within each head
            rows = self.shard.size * self.shard.world_size if self.shard else tensor.shape[0]
            assert self.shard is None or self.shard.dim == 0, f"{self.name}: q/k must be split by rows"
            tensor = unpermute_from_hf(tensor, self.rope_heads * tensor.shape[0] // rows)
        return tensor


def plan_reads(model: torch.nn.Module, checkpoint_dir: Path, args: ModelArgs,
               wanted: Callable[[str], bool] = lambda name: True, prefix: str = "") -> list[TensorRead]:
    """Match every checkpoint tensor to its place in `model`, from the files' headers alone.

    Each tensor's full shape is compared with the model's full (unsharded) shape before anything
    is read, on every rank and at every tensor-parallel size. All problems are reported at once,
    each naming its tensor: unknown, duplicated, mis-shaped and missing tensors.
    Works on a model on the meta device (nothing is allocated or read)."""
    fmt, files = checkpoint_files(checkpoint_dir)
    places = checkpoint_places(model)
    reads: dict[str, TensorRead] = {}
    seen: set[str] = set()
    unknown, twice, misshaped = [], [], []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                try:
                    full_name = _mistral_name(fmt, key, path)
                except CheckpointError:
                    unknown.append(key)
                    continue
                if full_name is None or not wanted(full_name):
                    continue
                name = full_name.removeprefix(prefix)
                if name not in places:
                    unknown.append(full_name)
                    continue
                if name in seen:
                    twice.append(full_name)
                    continue
                seen.add(name)
                target, shard = places[name]
                expected = _full_shape(target, shard)
                header = f.get_slice(key)
                shape = tuple(header.get_shape())
                if shape != expected:
                    misshaped.append(f"{full_name}: checkpoint shape {shape} != model shape {expected}")
                    continue
                local = math.prod(target.shape) * DTYPE_BYTES.get(header.get_dtype(), 4)
                heads = rope_heads(full_name, args) if fmt == "hf" else None
                reads[name] = TensorRead(path, key, full_name, target, shard, heads, local)
    missing = sorted(prefix + n for n in set(places) - seen)
    problems = [(unknown, "tensors with no parameter in the model (wrong config?)"), (twice, "tensors stored twice"),
                (misshaped, "mis-shaped tensors"), (missing, "missing tensors")]
    found = [f"{len(items)} {what}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
             for items, what in problems if items]
    if found:
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not fit its config: " + "; ".join(found))
    return list(reads.values())


def checkpoint_places(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, Shard | None]]:
    """Checkpoint tensor name (Mistral) -> (where this rank's piece goes, which piece).

    A merged layer (q/k/v, gate/up) stores its parts as separate checkpoint tensors; a parallel
    layer names its shard; every other parameter is replicated whole."""
    places = {}
    for pname, param in model.named_parameters():
        owner_name, _, leaf = pname.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, MergedColumnParallelLinear):
            parent = owner_name.rpartition(".")[0]
            for part, short in enumerate(owner.part_names):
                places[f"{parent}.{short}.{leaf}".lstrip(".")] = owner.shard_of(param, part)
        elif hasattr(owner, "shard_of"):
            places[pname] = owner.shard_of(param)
        else:
            places[pname] = (param, None)
    return {name: (target, shard if shard and shard.world_size > 1 else None)
            for name, (target, shard) in places.items()}


def checkpoint_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every checkpoint tensor the model expects."""
    return {name: _full_shape(target, shard) for name, (target, shard) in checkpoint_places(model).items()}


def _full_shape(target: torch.Tensor, shard: Shard | None) -> tuple[int, ...]:
    return shard.full_shape(tuple(target.shape)) if shard else tuple(target.shape)


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               tp: ParallelContext = SINGLE, with_vision_encoder: bool = True,
               tokenizer: str | Path | None = None) -> PixtralModel:
    """Build the model (this rank's shard) on `device` and read its weights from the checkpoint.

    Decoder replicas pass with_vision_encoder=False and never read the encoder's tensors."""
    checkpoint_dir = Path(checkpoint_dir)
    args = load_model_args(checkpoint_dir, tokenizer)
    with torch.device("meta"):
        model = PixtralModel(args, tp, with_vision_encoder=with_vision_encoder)
    wanted = (lambda n: True) if with_vision_encoder else (lambda n: not n.startswith("vision_encoder."))
    reads = plan_reads(model, checkpoint_dir, args, wanted)  # before allocating anything
    return _allocate_and_read(model, reads, checkpoint_dir, device, dtype, report=tp.rank == 0)


def load_vision_encoder(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None) -> VisionEncoder:
    """Only the vision encoder, for the vision pool: the decoder's tensors are never read."""
    checkpoint_dir = Path(checkpoint_dir)
    args = load_model_args(checkpoint_dir, tokenizer)
    assert args.vision_encoder is not None, f"{checkpoint_dir} has no vision encoder"
    with torch.device("meta"):
        encoder = VisionEncoder(args.vision_encoder)
    prefix = "vision_encoder."
    reads = plan_reads(encoder, checkpoint_dir, args, lambda n: n.startswith(prefix), prefix)
    return _allocate_and_read(encoder, reads, checkpoint_dir, device, dtype, report=True, prefix=prefix)


def _allocate_and_read(module: torch.nn.Module, reads: list[TensorRead], checkpoint_dir: Path,
                       device: str | torch.device, dtype: torch.dtype, report: bool, prefix: str = ""):
    """Allocate a meta-built module in `dtype` on `device`, read its planned weights, pack them."""
    cast_model(module, dtype)  # FP8 weights and their scales keep their own dtypes
    module.to_empty(device=device)
    _places_after_allocation(module, reads, prefix)
    read_weights(reads, checkpoint_dir, report)
    pack_linear_weights(module)  # CPU only; after the last change to the weights
    return frozen(module)


def frozen(module: torch.nn.Module):
    """`module` in eval mode with no parameter requiring grad. Serving never differentiates, and a
    forward outside inference mode (CUDA graph capture, say) must not record autograd history:
    FlexAttention raises on it when its block masks carry no query indices, as ours do not."""
    return module.eval().requires_grad_(False)


def _places_after_allocation(model: torch.nn.Module, reads: list[TensorRead], prefix: str = "") -> None:
    """Point each read at the allocated parameter (the plan was made on the meta device)."""
    places = checkpoint_places(model)
    for r in reads:
        r.target = places[r.name.removeprefix(prefix)][0]


def read_weights(reads: list[TensorRead], checkpoint_dir: Path, report: bool) -> None:
    """Read the planned tensors file by file into their targets."""
    progress = LoadProgress(sum(r.nbytes for r in reads), checkpoint_dir, enabled=report)
    to_device = HostToDevice()
    by_file: dict[Path, list[TensorRead]] = {}
    for r in reads:
        by_file.setdefault(r.path, []).append(r)
    with torch.no_grad():
        for path, file_reads in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for r in file_reads:
                    tensor = r.read(f)
                    to_device.copy(r.target, tensor)
                    progress.advance(tensor.numel() * tensor.element_size())
    to_device.finish()
    progress.done()


class HostToDevice:
    """Copies host tensors into parameters. To a GPU the copy goes through pinned memory and does
    not wait: the next tensor is read from disk while this one is in flight (bounded bytes)."""

    MAX_IN_FLIGHT_BYTES = 1 << 30

    def __init__(self) -> None:
        self.in_flight: list[torch.Tensor] = []
        self.in_flight_bytes = 0
        self.staged_any = False

    def copy(self, target: torch.Tensor, host: torch.Tensor) -> None:
        if target.device.type != "cuda":
            target.copy_(host)
            return
        staged = host.pin_memory()
        self.staged_any = True
        target.copy_(staged, non_blocking=True)
        self.in_flight.append(staged)  # must outlive its copy
        self.in_flight_bytes += staged.numel() * staged.element_size()
        if self.in_flight_bytes > self.MAX_IN_FLIGHT_BYTES:
            self.wait()

    def wait(self) -> None:
        if self.in_flight:
            torch.cuda.synchronize()
            self.in_flight.clear()
            self.in_flight_bytes = 0

    def finish(self) -> None:
        """Wait for the last copies, and give back the pinned staging memory. PyTorch keeps freed
        pinned blocks for reuse and never returns them: after a load that is gigabytes of locked
        host memory per process (the 1.3 GB embedding alone takes a 2 GiB block)."""
        self.wait()
        if self.staged_any and hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()


class LoadProgress:
    """How much of its share of a checkpoint this process has read: a progress bar on a terminal,
    a log line every few seconds otherwise, and the total time at the end. Only one process of a
    tensor-parallel group reports (rank 0); the others count silently."""

    LOG_EVERY_S = 5.0

    def __init__(self, total_bytes: int, where: Path, enabled: bool = True) -> None:
        self.total, self.done_bytes, self.where, self.enabled = max(total_bytes, 1), 0, where, enabled
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"loading {where.name}")

    def advance(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            return
        now = time.monotonic()
        if self.enabled and now - self.last > self.LOG_EVERY_S:
            self.last = now
            log.info("loading %s: %.0f%% of %.2f GB", self.where, 100 * self.done_bytes / self.total, self.total / 1e9)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            log.info("loaded %s: read %.2f GB in %.1fs", self.where, self.done_bytes / 1e9, time.monotonic() - self.start)
