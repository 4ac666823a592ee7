"""From pre-adapter vision features to decoder embeddings.

Pixtral-12B/Large: `w_out(GELU(w_in(x)))`. Later checkpoints of the same family (config-driven)
first apply an RMSNorm and merge each `m x m` block of patches into one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.linear import Linear


class VisionLanguageAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias: bool) -> None:
        super().__init__()
        self.w_in = Linear(in_dim, out_dim, bias=bias)
        self.w_out = Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))  # exact (erf) GELU


class PatchMerger(nn.Module):
    """Concatenate each m x m block of neighbouring patch features and project back to `dim`."""

    def __init__(self, dim: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = Linear(dim * merge * merge, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        merged = []
        for feats, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            grid = feats.view(h, w, -1).permute(2, 0, 1).unsqueeze(0)  # (1, d, h, w)
            blocks = F.unfold(grid, kernel_size=self.merge, stride=self.merge)  # (1, d*m*m, h/m * w/m)
            merged.append(blocks[0].T)  # (h/m * w/m, d*m*m)
        return self.merging_layer(torch.cat(merged, dim=0))
