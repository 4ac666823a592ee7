"""Pixtral: vision encoder + adapter + Mistral decoder, with parameter names equal to the
Mistral-format checkpoint keys (so loading is one strict loop).

The vision path is split in two on purpose: `encode_images` produces pre-adapter features (the
vision pool runs it), `project_images` applies the adapter (the decoder runs it), because the
pre-adapter features are 5-12x smaller to ship between machines.
"""

from __future__ import annotations

import torch
from torch import nn

from model.adapter import PatchMerger, VisionLanguageAdapter
from model.config import ModelArgs
from model.decoder import DecoderLayer
from model.layers.attention import AttentionMetadata, KVCache
from model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from model.layers.norm import RMSNorm
from model.layers.rotary import rope_angles_1d, rope_rotation
from model.parallel import SINGLE, ParallelContext
from model.vision_encoder import VisionEncoder


class PixtralModel(nn.Module):
    def __init__(self, args: ModelArgs, tp: ParallelContext = SINGLE, with_vision_encoder: bool = True) -> None:
        super().__init__()
        self.args = args
        self.tp = tp
        self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, tp)
        self.layers = nn.ModuleList(DecoderLayer(args, tp) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = ParallelLMHead(args.vocab_size, args.dim, tp)
        vision = args.vision_encoder
        if vision is None:
            return
        # The decoder replica may leave the encoder out: the vision pool runs it.
        self.vision_encoder = VisionEncoder(vision) if with_vision_encoder else None
        self.pre_mm_projector_norm = RMSNorm(vision.hidden_size, args.norm_eps) if vision.add_pre_mm_projector_layer_norm else None
        self.patch_merger = PatchMerger(vision.hidden_size, vision.spatial_merge_size) if vision.uses_patch_merger else None
        self.vision_language_adapter = VisionLanguageAdapter(vision.hidden_size, args.dim, vision.adapter_bias)

    # -- vision -------------------------------------------------------------------------------
    def encode_images(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalised (C, H, W) images -> pre-adapter patch features and patch grids."""
        assert self.vision_encoder is not None, "this replica was built without the vision encoder"
        return self.vision_encoder(images)

    def project_images(self, features: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """Pre-adapter features -> one decoder embedding per [IMG] token, (n_img_tokens, dim)."""
        x = features.to(self.vision_language_adapter.w_in.weight.dtype)
        if self.pre_mm_projector_norm is not None:
            x = self.pre_mm_projector_norm(x)
        if self.patch_merger is not None:
            x = self.patch_merger(x, grids)
        return self.vision_language_adapter(x)

    # -- decoder ------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features written at the [IMG] positions, in prompt order.

        `image_rows`: those positions, when the caller counted them on the host (the engine does);
        else they are found here, which waits on the device once.
        """
        x = self.tok_embeddings(tokens)
        n_img = 0 if image_embeds is None else image_embeds.shape[0]
        if self.args.vision_encoder is None:
            assert n_img == 0, "text-only model got image features"
            return x
        if image_rows is None:
            is_img = tokens == self.args.vision_encoder.image_token_id
            image_rows = is_img.nonzero()[:, 0]
        assert image_rows.shape[0] == n_img, f"{image_rows.shape[0]} [IMG] tokens but {n_img} image features"
        if n_img:
            x = x.index_copy(0, image_rows, image_embeds.to(x.dtype))
        return x

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionMetadata,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """x: (T, dim) input embeddings of a ragged batch -> (T, dim) final hidden states."""
        rotation = rope_rotation(rope_angles_1d(positions, self.args.head_dim, self.args.rope_theta))
        for i, layer in enumerate(self.layers):
            x = layer(x, rotation, batch, None if caches is None else caches[i])
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)  # fp32, full vocabulary on every rank

    @torch.inference_mode()
    def logits_no_cache(self, tokens: torch.Tensor, images: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Reference full forward of one prompt, no KV cache: (T,) tokens -> (T, vocab) fp32 logits."""
        embeds = None
        if images:
            feats, grids = self.encode_images(images)
            embeds = self.project_images(feats, grids)
        x = self.embed(tokens, embeds)
        positions = torch.arange(tokens.shape[0], device=tokens.device)
        return self.compute_logits(self(x, positions, AttentionMetadata.no_cache([tokens.shape[0]])))
