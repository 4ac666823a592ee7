"""Pixtral image preprocessing, bit-for-bit as mistral-common does it, split where the bytes are cheapest.

mistral-common: RGB (transparency over white) -> cv2 INTER_CUBIC resize of float32 pixels to a
whole number of patches, longest side at most `max_image_size` (small images are upscaled) ->
/255, minus CLIP mean, over CLIP std, in float32 -> CHW. No clamping after the cubic resize.

The ingress decodes and ships uint8 RGB (1 byte per channel instead of 4); the vision replica
resizes and normalises. Resizing float32 copies of the same uint8 values gives the same floats
wherever it runs, so the result equals mistral-common's exactly.
"""

from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # RGB
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def token_grid(width: int, height: int, patch_size: int, max_image_size: int, merge: int = 1) -> tuple[int, int]:
    """(tokens per row, rows) for an image: longest side scaled down to max_image_size, then whole patches."""
    w, h = float(width), float(height)
    ratio = max(h / max_image_size, w / max_image_size)
    if ratio > 1:
        w, h = max(round(w / ratio), 1), max(round(h / ratio), 1)
    step = patch_size * merge
    return int((w - 1) // step + 1), int((h - 1) // step + 1)


def image_token_ids(grid: tuple[int, int], img: int, img_break: int, img_end: int) -> list[int]:
    """Row-major [IMG] tokens, each row closed by [IMG_BREAK], the last by [IMG_END]."""
    nw, nh = grid
    tokens = ([img] * nw + [img_break]) * nh
    tokens[-1] = img_end
    return tokens


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (h, w, 3) at size=(w, h), cubic, unclamped."""
    import cv2

    return cv2.resize(rgb.astype(np.float32), size, interpolation=cv2.INTER_CUBIC)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """float32 (H, W, 3) in [0, 255] (any device) -> normalised (3, H, W), mistral-common's op order."""
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=pixels.device)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=pixels.device)
    x = pixels.float() / torch.tensor(255.0, dtype=torch.float32, device=pixels.device)
    return ((x - mean) / std).permute(2, 0, 1).contiguous()


def preprocess(rgb: np.ndarray, patch_size: int, max_image_size: int, merge: int = 1,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> the normalised (3, h, w) model input."""
    nw, nh = token_grid(rgb.shape[1], rgb.shape[0], patch_size, max_image_size, merge)
    step = patch_size * merge
    resized = resize(rgb, (nw * step, nh * step))
    return normalize(torch.from_numpy(resized).to(device))
