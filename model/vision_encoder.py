"""Pixtral vision encoder (ViT): images of any size -> one pre-adapter feature per 16x16 patch.

Data parallel only: every GPU of the vision pool holds a full replica, so the layers are plain
(unsharded) linear layers.

Images of a batch never attend to each other. Rather than one attention over all patches with an
N x N block-diagonal mask (1 GB of mask alone for 8 images of 1024x1024, and a mask keeps CUDA on
its slowest SDPA backend), the patches are ordered so that images with the same patch count sit
side by side, and each such run is one batched SDPA call, (images, heads, patches, head_dim),
without a mask. Fused kernels take that shape on CUDA (head_dim 88 included) and on CPU, and
memory grows linearly with the number of images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionEncoderArgs
from model.layers.linear import Linear
from model.layers.norm import RMSNorm
from model.layers.rotary import apply_rope, rope_angles_2d, rope_rotation

NORM_EPS = 1e-5


class VisionAttention(nn.Module):
    def __init__(self, args: VisionEncoderArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.wq = Linear(args.hidden_size, args.hidden_size, bias=False)
        self.wk = Linear(args.hidden_size, args.hidden_size, bias=False)
        self.wv = Linear(args.hidden_size, args.hidden_size, bias=False)
        self.wo = Linear(args.hidden_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """x: (N, hidden), the patches of runs of same-sized images; runs: (images, patches each)."""
        n = x.shape[0]
        q = apply_rope(self.wq(x).view(n, self.n_heads, self.head_dim), rotation)  # (N, h, d)
        k = apply_rope(self.wk(x).view(n, self.n_heads, self.head_dim), rotation)
        v = self.wv(x).view(n, self.n_heads, self.head_dim)
        outs, start = [], 0
        for count, patches in runs:
            end = start + count * patches

            def per_image(t: torch.Tensor) -> torch.Tensor:  # (count, h, patches, d), a view
                return t[start:end].view(count, patches, self.n_heads, self.head_dim).transpose(1, 2)

            out = F.scaled_dot_product_attention(per_image(q), per_image(k), per_image(v), scale=self.head_dim ** -0.5)
            outs.append(out.transpose(1, 2).reshape(end - start, -1))
            start = end
        return self.wo(outs[0] if len(outs) == 1 else torch.cat(outs))


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

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rotation, runs)
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
        # same-sized images side by side (a stable sort), each (hidden, h, w) grid flattened row-major
        order = sorted(range(len(grids)), key=lambda i: grids[i][0] * grids[i][1])
        x = self.ln_pre(torch.cat([patches[i].flatten(1).T for i in order], dim=0))  # (N, hidden)
        rotation = rope_rotation(rope_angles_2d([grids[i] for i in order], self.args.head_dim, self.args.rope_theta,
                                                x.device))
        runs = same_size_runs([grids[i][0] * grids[i][1] for i in order])
        for layer in self.transformer.layers:
            x = layer(x, rotation, runs)
        if order != list(range(len(order))):  # back to the caller's order
            parts = x.split([grids[i][0] * grids[i][1] for i in order])
            by_image = dict(zip(order, parts))
            x = torch.cat([by_image[i] for i in range(len(grids))])
        return x, grids


def same_size_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive equal lengths -> (how many, length) runs: [4, 4, 9] -> [(2, 4), (1, 9)]."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0] + 1, n)
        else:
            runs.append((1, n))
    return runs
