"""FP8 weights with one scale per output channel: the published FP8 Pixtral checkpoints.

FP8 conversions of Pixtral (llm-compressor's FP8_DYNAMIC scheme, saved as compressed-tensors in
the Hugging Face Llava layout) store every decoder linear weight as float8_e4m3fn with a
`weight_scale` of shape (out_features, 1): W = weight * weight_scale. Activations are quantised
per token at run time. The vision tower, the projector and lm_head stay in bf16.

- On GPUs with FP8 tensor cores (compute capability 8.9 and up: L4, H100, H200) the matmul runs
  in FP8 through `torch._scaled_mm`, with the per-token activation scales and per-channel weight
  scales applied to its fp32 accumulator.
- Everywhere else (CPU, older GPUs) the layer keeps its FP8 weight in memory and dequantises it
  for each matmul, in the activation dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
SCALE_NAME = "weight_scale"


def quantize_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 weight, scale of shape (out, 1) in `scale_dtype`): each row scaled so that its largest
    value is FP8's largest, as the FP8_DYNAMIC scheme does (scales are stored in the model's dtype,
    and the weight is quantised with the stored scale). Used to write FP8 checkpoints."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX).to(scale_dtype)
    return (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # FP8 values are exact in bf16/fp16/fp32, so the only rounding is that of the product
    return weight.to(dtype) * scale.to(dtype)


@functools.cache
def _has_fp8_matmul(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (weight * scale).T for an FP8 `weight` (out, in) and fp32 `scale` (out, 1)."""
    if x.is_cuda and _has_fp8_matmul(x.device.index or 0):
        rows = x.reshape(-1, x.shape[-1])
        # dynamic per-token scales: each row's largest value maps to FP8's largest
        x_scale = rows.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        x_fp8 = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        # row-wise scaling gives bf16 or fp16 only (PyTorch's check, on sm89 and older cuBLAS): an
        # fp32 model takes bf16 out, below the FP8 rounding of x anyway
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=scale.reshape(1, -1), out_dtype=out_dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, dequantize(weight, scale, x.dtype))


def fp8_parameters(out_features: int, in_features: int) -> tuple[nn.Parameter, nn.Parameter]:
    """An FP8 weight and its fp32 per-channel scale (both kept in these dtypes by `cast_model`)."""
    weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
    return weight, nn.Parameter(torch.empty(out_features, 1), requires_grad=False)


def keeps_dtype(name: str, param: torch.Tensor) -> bool:
    return param.dtype == FP8_DTYPE or name.endswith(SCALE_NAME)


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """`model.to(dtype)`, except FP8 weights and their scales (which `to` would convert too)."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not keeps_dtype(name, param):
            param.data = param.data.to(dtype)
