"""Linear layers that hold one tensor-parallel shard, and say where it lies in the checkpoint.

ColumnParallelLinear splits the output features (no communication); RowParallelLinear splits the
input features and all-reduces the partial sums. A column layer followed by a row layer (attention
qkv -> wo, feed-forward w1/w3 -> w2) needs exactly one all-reduce.

A sharded layer never sees the full tensor: its `shard_of` tells the loader which slice of the
checkpoint tensor to read and where in the parameter it goes, so each rank reads only its shard
and the loader can check the full shape before reading anything.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.fp8 import FP8_DTYPE, fp8_linear, fp8_parameters
from model.parallel import SINGLE, ParallelContext, Shard

log = logging.getLogger(__name__)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), through the CPU-packed copy of the weight when there is one."""
    if packed is not None and x.is_cpu and x.dim() == 2 and x.dtype == packed.dtype:
        rows = x.shape[0]
        padded = packed_rows(rows)
        if padded != rows:  # zero rows: a row's result does not depend on the others (tests/test_layers.py)
            x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")[:rows]
    return F.linear(x, weight, bias)


def packed_rows(rows: int) -> int:
    """How many rows a packed matmul of `rows` runs with: up to 16 exactly, then rounded up to one
    of 8 sizes per power of two (at most 1/8 more work).

    oneDNN compiles, and caches, one kernel per weight shape and row count. A server's steps have
    any row count up to the token budget, so without rounding every new count costs a compile on
    the hot path and a cache entry (about 0.4 MiB, up to 1024 entries per cache): the process grew
    by hundreds of MiB over a long run. With it, a weight shape sees at most 88 row counts up to
    8192 rows."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


# Which dtypes may pack: "auto" (every dtype this CPU supports), "none", or a comma-separated list
# such as "float32" (what a CPU without AVX-512 gets). Read at each load, so a test run can force
# the plain path on a CPU that could pack.
PACKING_ENV = "PIXTRAL_SERVE_CPU_PACKING"
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def packing_unsupported_reason(dtype: torch.dtype) -> str | None:
    """Why this CPU cannot run oneDNN's packed linear in `dtype`, or None when it can.

    Asked once per dtype and process. oneDNN's bf16 reorder needs AVX-512 (BW/VL/DQ) or
    AVX-NE-CONVERT and raises without them, so the honest test is to pack and run a tiny layer.
    """
    if dtype not in PACKABLE_DTYPES:
        return f"oneDNN packing is only used for {', '.join(str(d) for d in PACKABLE_DTYPES)}"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "this PyTorch build has no oneDNN (mkldnn)"
    weight = torch.arange(24, dtype=torch.float32).reshape(4, 6).to(dtype)
    x = torch.ones(2, 6, dtype=dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError as error:  # oneDNN names the missing CPU feature
        return str(error).splitlines()[0]
    if not torch.equal(out, F.linear(x, weight)):  # small integers: exact in either dtype
        return "oneDNN's packed linear gave a wrong result in a self-check"
    return None


@functools.cache
def packed_rows_independent(dtype: torch.dtype) -> bool:
    """Whether this PyTorch's oneDNN gives a row of a packed linear the same result alone as in a
    batch, in `dtype` (asked once per dtype and process; only where `dtype` packs).

    PyTorch 2.13's oneDNN does, at every row count the tests try. PyTorch 2.11's does not: its
    AVX2 fp32 kernel takes rows in blocks of 6 and the tail rows through another kernel, so a row
    moves in the last bits with its batch mates, as it does through MKL's sgemm. A batch of 40
    (six full blocks and a tail of 4) against each row alone tells the two apart."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 256, generator=gen).to(dtype)
    x = torch.randn(40, 256, generator=gen).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    batch = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return all(torch.equal(torch.ops.mkldnn._linear_pointwise(x[i:i + 1], packed, None, "none", [], "")[0], batch[i])
               for i in range(len(x)))


def packing_path(dtype: torch.dtype) -> tuple[bool, str]:
    """(whether CPU weights of `dtype` are packed, why) under this CPU and PIXTRAL_SERVE_CPU_PACKING."""
    wanted = os.environ.get(PACKING_ENV, "auto").strip().lower() or "auto"
    name = str(dtype).removeprefix("torch.")
    if wanted != "auto" and name not in {d.strip() for d in wanted.split(",")}:
        return False, f"{PACKING_ENV}={wanted}"
    reason = packing_unsupported_reason(dtype)
    return reason is None, reason or "supported by this CPU"


@functools.cache
def _log_packing_path(dtype: torch.dtype, packed: bool, why: str) -> None:
    """One line per dtype and path per process, at load time."""
    path = "oneDNN matmul on weights packed at load" if packed else "plain matmul (torch.nn.functional.linear)"
    if packed and not packed_rows_independent(dtype):
        path += ", a row's result moving in the last bits with its batch mates in this PyTorch's oneDNN"
    log.info("CPU linear layers in %s: %s (%s)", str(dtype).removeprefix("torch."), path, why)


class PackableLinear:
    """A layer whose `weight` is used as `x @ weight.T`, and may keep a CPU-packed copy of it.

    On CPU, oneDNN with the weight reordered once into its blocked layout runs these matmuls
    about 2x faster than the BLAS path for decode-sized batches (1-32 rows) and 1.2-1.4x for
    prefill, still in plain fp32 arithmetic, and with PyTorch 2.13's oneDNN gives a row the same
    result whatever else is in the batch (`packed_rows_independent`, tests/test_layers.py).
    The packed copy is made by `pack_linear_weights` after loading (it does not follow later
    in-place changes of `weight`); GPUs never pack, and neither does a dtype this CPU cannot
    pack (bf16 without AVX-512): those take the plain matmul.
    """

    packed_weight: torch.Tensor | None = None

    @property
    def packable(self) -> bool:
        return self.weight.device.type == "cpu" and self.weight.dtype != FP8_DTYPE  # FP8 dequantises per matmul

    def pack(self, enabled: bool = True) -> None:
        self.packed_weight = None
        if enabled and self.packable and packing_path(self.weight.dtype)[0]:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())


def pack_linear_weights(model: nn.Module, enabled: bool = True) -> int:
    """Pack every PackableLinear of `model` for CPU inference (enabled=False drops the packed
    copies, back to the plain matmul); returns how many are packed. Logs once per dtype which
    path its CPU layers take."""
    packed = 0
    for module in model.modules():
        if isinstance(module, PackableLinear):
            module.pack(enabled)
            packed += module.packed_weight is not None
            if enabled and module.packable:
                _log_packing_path(module.weight.dtype, *packing_path(module.weight.dtype))
    return packed


class Linear(PackableLinear, nn.Linear):
    """nn.Linear (same parameters and initialisation) that runs through the packed path when packed.

    For layers that are never sharded: the vision encoder and the vision-language adapter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class ColumnParallelLinear(PackableLinear, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(tp.shard(out_features, "output features"), in_features))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0])) if bias else None

    def shard_of(self, param: nn.Parameter, part: int | None = None) -> tuple[torch.Tensor, Shard]:
        return param, self.tp.shard_slice(0, param.shape[0])  # weight rows and bias alike

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.packed_weight)


class RowParallelLinear(PackableLinear, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: ParallelContext = SINGLE,
                 fp8: bool = False) -> None:
        super().__init__()
        assert not bias, "row-parallel bias would be added once per rank"
        self.tp = tp
        local_in = tp.shard(in_features, "input features")
        if fp8:  # the per-output-channel scale is whole on every rank
            self.weight, self.weight_scale = fp8_parameters(out_features, local_in)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, local_in))
            self.weight_scale = None

    def shard_of(self, param: nn.Parameter, part: int | None = None) -> tuple[torch.Tensor, Shard]:
        if param is self.weight_scale:
            return param, Shard(0, 0, param.shape[0], 1)
        return param, self.tp.shard_slice(1, param.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale is not None:
            return self.tp.all_reduce(fp8_linear(x, self.weight, self.weight_scale))
        return self.tp.all_reduce(linear(x, self.weight, packed=self.packed_weight))


class MergedColumnParallelLinear(PackableLinear, nn.Module):
    """Several column-parallel projections of one input as one matmul (q/k/v, or gate/up).

    The checkpoint stores the parts separately (`part_names`); each loads into its own rows of this
    rank's weight, which holds this rank's slice of every part.
    """

    def __init__(self, in_features: int, out_features: list[int], part_names: list[str],
                 tp: ParallelContext = SINGLE, fp8: bool = False) -> None:
        super().__init__()
        assert len(out_features) == len(part_names), (out_features, part_names)
        self.tp = tp
        self.part_names = part_names
        self.sizes = [tp.shard(n, f"output features of {p}") for n, p in zip(out_features, part_names)]
        if fp8:  # each part's scale rows sit beside its weight rows
            self.weight, self.weight_scale = fp8_parameters(sum(self.sizes), in_features)
        else:
            self.weight = nn.Parameter(torch.empty(sum(self.sizes), in_features))
            self.weight_scale = None

    def shard_of(self, param: nn.Parameter, part: int | None = None) -> tuple[torch.Tensor, Shard]:
        """Part `part` (e.g. k of q/k/v): this rank's slice of it, into its own rows of the weight."""
        assert part is not None, "a merged layer loads part by part"
        size, offset = self.sizes[part], sum(self.sizes[:part])
        return param.data.narrow(0, offset, size), self.tp.shard_slice(0, size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.weight_scale is not None:
            return fp8_linear(x, self.weight, self.weight_scale).split(self.sizes, dim=-1)
        return linear(x, self.weight, packed=self.packed_weight).split(self.sizes, dim=-1)
