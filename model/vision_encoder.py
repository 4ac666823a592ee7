"""Pixtral vision encoder (ViT): images of any size -> one pre-adapter feature per 16x16 patch.

Data parallel only: every GPU of the vision pool holds a full replica, so the layers are plain
(unsharded) linear layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionEncoderArgs
from model.layers.linear import Linear
from model.layers.norm import RMSNorm
from model.layers.rotary import apply_rope, rope_angles_2d

NORM_EPS = 1e-5


class VisionAttention(nn.Module):
    def __init__(self, args: VisionEncoderArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.wq = Linear(args.hidden_size, args.hidden_size, bias=False)
        self.wk = Linear(args.hidden_size, args.hidden_size, bias=False)
        self.wv = Linear(args.hidden_size, args.hidden_size, bias=False)
        self.wo = Linear(args.hidden_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, same_image: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[0]
        q = apply_rope(self.wq(x).view(n, self.n_heads, self.head_dim), angles)  # (N, h, d)
        k = apply_rope(self.wk(x).view(n, self.n_heads, self.head_dim), angles)
        v = self.wv(x).view(n, self.n_heads, self.head_dim)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # (h, N, d)
            attn_mask=same_image, scale=self.head_dim ** -0.5)
        return self.wo(out.transpose(0, 1).reshape(n, -1))


class VisionFeedForward(nn.Module):
    def __init__(self, args: VisionEncoderArgs) -> None:
        super().__init__()
        self.w1 = Linear(args.hidden_size, args.intermediate_size, bias=False)  # gate
        self.w2 = Linear(args.intermediate_size, args.hidden_size, bias=False)  # down
        self.w3 = Linear(args.hidden_size, args.intermediate_size, bias=False)  # up
        self.act = F.silu if args.hidden_act == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionEncoderArgs) -> None:
        super().__init__()
        self.attention = VisionAttention(args)
        self.feed_forward = VisionFeedForward(args)
        self.attention_norm = RMSNorm(args.hidden_size, NORM_EPS)
        self.ffn_norm = RMSNorm(args.hidden_size, NORM_EPS)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, same_image: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), angles, same_image)
        return x + self.feed_forward(self.ffn_norm(x))


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionEncoderArgs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(args) for _ in range(args.num_hidden_layers))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionEncoderArgs) -> None:
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, kernel_size=args.patch_size,
                                    stride=args.patch_size, bias=False)
        self.ln_pre = RMSNorm(args.hidden_size, NORM_EPS)
        self.transformer = VisionTransformer(args)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """images: normalised (C, H, W) tensors, H and W multiples of patch_size.

        Returns the patch features of all images concatenated, (sum(h*w), hidden), and each
        image's grid (h, w) in patches.
        """
        # pass images through the initial convolution independently (sizes differ)
        patches = [self.patch_conv(img.unsqueeze(0).to(self.patch_conv.weight.dtype))[0] for img in images]
        grids = [(p.shape[1], p.shape[2]) for p in patches]
        # flatten each (hidden, h, w) grid row-major and concatenate all images into one sequence
        x = self.ln_pre(torch.cat([p.flatten(1).T for p in patches], dim=0))  # (N, hidden)
        angles = rope_angles_2d(grids, self.args.head_dim, self.args.rope_theta, x.device)
        same_image = block_diagonal_mask(grids, x.device)
        for layer in self.transformer.layers:
            x = layer(x, angles, same_image)
        return x, grids


def block_diagonal_mask(grids: list[tuple[int, int]], device: torch.device) -> torch.Tensor | None:
    """(N, N) boolean mask: a patch attends only to the patches of its own image."""
    if len(grids) == 1:
        return None
    image_of_patch = torch.repeat_interleave(
        torch.arange(len(grids), device=device), torch.tensor([h * w for h, w in grids], device=device))
    return image_of_patch[:, None] == image_of_patch[None, :]
