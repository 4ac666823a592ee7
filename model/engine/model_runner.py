"""One tensor-parallel rank of the model: owns the weights, the paged KV cache and every tensor.

The engine sends each rank the same small `StepInput` (token ids, positions, block tables, which
rows to sample); each rank runs the forward pass on its shard; rank 0 also samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from model.engine.cuda_graphs import DecodeGraphs
from model.engine.sampler import SamplerState, TokenLogprobs, sample
from model.engine.sampling_params import SamplingParams
from model.layers.attention import AttentionMetadata, KVCache, backend_for
from model.pixtral import PixtralModel


@dataclass
class ImageFeatures:
    """Pre-adapter features of one image, as the vision encoder produced them."""

    features: torch.Tensor  # (h*w, hidden)
    grid: tuple[int, int]  # (h, w) in patches


@dataclass
class SeqChunk:
    seq_id: int
    token_ids: list[int]  # the tokens computed in this step
    start: int  # position of the first of them
    block_table: list[int]
    sample: bool
    image_offset: int = 0  # number of [IMG] tokens before `start` (to index the image embeddings)
    allowed: torch.Tensor | None = None  # packed mask of the tokens its grammar allows next (sampling chunks)


@dataclass
class StepInput:
    chunks: list[SeqChunk]
    new_sequences: dict[int, SamplingParams] = field(default_factory=dict)
    new_images: dict[int, list[ImageFeatures]] = field(default_factory=dict)
    finished: list[int] = field(default_factory=list)


@dataclass
class StepOutput:
    tokens: list[int]  # one per sampling chunk, in chunk order (-1 where sampling failed)
    logprobs: list[TokenLogprobs | None]
    failed: dict[int, str] = field(default_factory=dict)  # seq id -> why its sampling failed


def kv_block_bytes(model: PixtralModel, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block on one rank: keys and values of every layer."""
    args = model.args
    n_kv = args.n_kv_heads // model.tp.world_size
    return 2 * args.n_layers * block_size * n_kv * args.head_dim * torch.empty(0, dtype=dtype).element_size()


@torch.inference_mode()
def profile_forward(model: PixtralModel, num_tokens: int) -> None:
    """One cache-free forward of `num_tokens` tokens, an image's worth of them image embeddings
    (the projection runs too): the activation peak of the largest step the scheduler may run."""
    weight = model.tok_embeddings.weight
    tokens = torch.ones(num_tokens, dtype=torch.long, device=weight.device)
    embeds = None
    vision = model.args.vision_encoder
    if vision is not None:
        merge = vision.spatial_merge_size
        side = max(int(num_tokens ** 0.5) // merge * merge, merge)  # a square image of at most num_tokens tokens
        grid = (side, side)
        feats = torch.zeros(side * side, vision.hidden_size, dtype=weight.dtype, device=weight.device)
        embeds = model.project_images(feats, [grid])
        tokens[:embeds.shape[0]] = vision.image_token_id
    x = model.embed(tokens, embeds)
    model(x, torch.arange(num_tokens, device=weight.device),
          AttentionMetadata.no_cache([num_tokens], backend_for(weight.device)))


class ModelRunner:
    """`decode_batch_sizes`: pad a decode-only step up to the next of these batch sizes with rows that
    write to a scratch KV page of their own and are never sampled. None: batches run as they come.

    On the FlexAttention backend (CUDA's), those steps run on static buffers with block tables
    `max_pages` wide (`DecodeGraphs`), captured as CUDA graphs on CUDA when `cuda_graphs`; a step
    whose contexts are wider, or whose batch is larger than every size, runs eagerly. On the torch
    backend the padding only serves to show it changes nothing."""

    def __init__(self, model: PixtralModel, num_blocks: int, block_size: int,
                 decode_batch_sizes: list[int] | None = None, max_pages: int | None = None,
                 cuda_graphs: bool = True) -> None:
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.decode_batch_sizes = sorted(decode_batch_sizes or [])
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.attention_backend = backend_for(self.device)
        n_kv = model.args.n_kv_heads // model.tp.world_size
        # one page past the engine's blocks: the padding rows' scratch page (the block manager never hands it out)
        self.scratch_block = num_blocks
        shape = (num_blocks + (1 if self.decode_batch_sizes else 0), block_size, n_kv, model.args.head_dim)
        self.kv_caches = [KVCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                                  torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(model.args.n_layers)]
        self.graphs: DecodeGraphs | None = None
        if self.decode_batch_sizes and self.attention_backend == "flex":
            self.graphs = DecodeGraphs(model, self.kv_caches, self.decode_batch_sizes, max_pages or num_blocks,
                                       block_size, self.scratch_block, capture=cuda_graphs and self.device.type == "cuda")
        self.image_embeds: dict[int, torch.Tensor] = {}  # seq id -> post-adapter embeddings (host memory)
        self.samplers: dict[int, SamplerState] = {}
        self.is_driver = model.tp.rank == 0

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        for seq_id, params in step.new_sequences.items():
            if self.is_driver:
                self.samplers[seq_id] = SamplerState.create(params, self.device)
        for seq_id, images in step.new_images.items():
            self.image_embeds[seq_id] = self._project(images)
        output = StepOutput([], [])
        if step.chunks:
            output = self._run(step.chunks)
        for seq_id in step.finished:
            self.image_embeds.pop(seq_id, None)
            self.samplers.pop(seq_id, None)
        return output

    def _project(self, images: list[ImageFeatures]) -> torch.Tensor:
        if self.device.type != "cuda":
            feats = torch.cat([img.features for img in images])
            return self.model.project_images(feats, [img.grid for img in images])
        # Kept for the sequence's life (a recompute after preemption reads them again) in host
        # memory: on the GPU they would take 40 MiB per 1024x1024 image on Pixtral-12B (96 MiB per
        # rank on Large) for every running sequence, outside the KV cache's budget. Pageable, not
        # pinned: PyTorch caches pinned blocks rounded up to a power of two and never returns them,
        # and a failed pinned allocation is a CUDA error. The copies wait on the stream, at the
        # start and end of work the step does anyway. One image at a time, so that the adapter's
        # peak is one image's, as the profiling pass measured (up to max_num_batched_tokens tokens).
        return torch.cat([self.model.project_images(img.features.to(self.device), [img.grid]).cpu()
                          for img in images])

    def _run(self, chunks: list[SeqChunk]) -> StepOutput:
        static = self._static_decode_size(chunks)
        if static is not None:
            return self._sample(chunks, list(range(len(chunks))), self.graphs.run(static, chunks))
        chunks = self._padded(chunks)
        sampled = [i for i, c in enumerate(chunks) if c.sample]
        query_lens = [len(c.token_ids) for c in chunks]
        last_rows = list(itertools.accumulate(query_lens, initial=-1))[1:]  # each chunk's last token
        image_rows, embeds = self._image_inputs(chunks)
        # everything this step needs on the device, in one copy: token ids, positions, the rows
        # whose logits are sampled, where image embeddings go, and the attention metadata
        meta = AttentionMetadata.build(
            query_lens, [c.start + len(c.token_ids) for c in chunks], [c.block_table for c in chunks],
            self.block_size, self.device,
            extra={"tokens": [t for c in chunks for t in c.token_ids],
                   "positions": [c.start + i for c in chunks for i in range(len(c.token_ids))],
                   "sampled_rows": [last_rows[i] for i in sampled],
                   "image_rows": image_rows},
            backend=self.attention_backend)
        x = self.model.embed(meta.extra["tokens"], embeds, meta.extra["image_rows"] if embeds is not None else None)
        hidden = self.model(x, meta.extra["positions"], meta, self.kv_caches)
        if not sampled:
            return StepOutput([], [])
        logits = self.model.compute_logits(hidden[meta.extra["sampled_rows"]])  # a collective: every rank takes part
        return self._sample(chunks, sampled, logits)

    def _static_decode_size(self, chunks: list[SeqChunk]) -> int | None:
        """The static decode size for a step that can run on one (every chunk one sampled text token)."""
        if self.graphs is None or any(len(c.token_ids) != 1 or not c.sample for c in chunks):
            return None
        vision = self.model.args.vision_encoder
        if vision is not None and any(c.token_ids[0] == vision.image_token_id for c in chunks):
            return None
        return self.graphs.size_for(len(chunks), max(c.start + 1 for c in chunks))

    def _sample(self, chunks: list[SeqChunk], sampled: list[int], logits: torch.Tensor) -> StepOutput:
        """Rank 0 samples the rows `sampled` (chunk indices) from their logits."""
        if not self.is_driver:
            return StepOutput([], [])
        states = [self.samplers[chunks[i].seq_id] for i in sampled]
        ids, logprobs, failed_rows = sample(logits, states, [chunks[i].allowed for i in sampled])
        return StepOutput(ids, logprobs, {chunks[sampled[row]].seq_id: why for row, why in failed_rows.items()})

    def _padded(self, chunks: list[SeqChunk]) -> list[SeqChunk]:
        """A decode-only step padded to the next decode batch size (unchanged otherwise)."""
        if not self.decode_batch_sizes or any(len(c.token_ids) != 1 for c in chunks):
            return chunks
        size = next((b for b in self.decode_batch_sizes if b >= len(chunks)), len(chunks))
        # token 0 at position 0, its one-token context on the scratch page; never sampled
        pad = SeqChunk(seq_id=-1, token_ids=[0], start=0, block_table=[self.scratch_block], sample=False)
        return chunks + [pad] * (size - len(chunks))

    def _image_inputs(self, chunks: list[SeqChunk]) -> tuple[list[int], torch.Tensor | None]:
        """The rows of the flat batch that hold [IMG] tokens (counted on the host), and the image
        embeddings for them in token order (chunks may cut an image). One pass over the tokens."""
        vision = self.model.args.vision_encoder
        if vision is None:
            return [], None
        rows, parts, row = [], [], 0
        for c in chunks:
            mine = [row + i for i, t in enumerate(c.token_ids) if t == vision.image_token_id]
            if mine:
                rows += mine
                embeds = self.image_embeds[c.seq_id][c.image_offset:c.image_offset + len(mine)]
                parts.append(embeds.to(self.device))  # from host memory on CUDA
            row += len(c.token_ids)
        return rows, torch.cat(parts) if parts else None
