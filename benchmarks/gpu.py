"""The GPU hot path against its floors: decode, prefill and vision at Pixtral-12B's real shape.

    python -m benchmarks.gpu                         # CUDA, Pixtral-12B's shape in bf16 (random weights)
    python -m benchmarks.gpu --device cpu --small    # a small shape on CPU: checks the script runs

Each figure is printed beside its floor and the ratio to it:
- decode ms/step at batch 1, 8 and 32, every sequence with a 4,160-token context (a 1024x1024
  image prompt): floor = (decoder weight bytes + KV bytes read) / memory bandwidth;
- prefill ms of one 1024x1024 image prompt (4,160 tokens, one chunk): floor = FLOPs / peak;
- vision ms for 1 and 8 images of 1024x1024, with the peak memory of the 8-image batch.

The bandwidth and peak FLOP/s are the GPU's published figures where its name is known (H100,
H200, A100, L4); elsewhere, or with --measured-peaks, the copy bandwidth and matmul throughput
measured here. Decode runs through the engine's `ModelRunner` (metadata, sampling and all), with
and without CUDA graphs. Needs only torch and this repository's `model/` (no Ray).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass

import torch

from model.config import ModelArgs, VisionEncoderArgs
from model.engine.model_runner import ImageFeatures, ModelRunner, SeqChunk, StepInput
from model.engine.sampling_params import SamplingParams
from model.tiny import random_model

CONTEXT = 4160  # a 1024x1024 image at patch 16: 64 rows of 64 [IMG] + one [IMG_BREAK]/[IMG_END]
BATCHES = (1, 8, 32)

# published dense bf16 FLOP/s and memory bandwidth (bytes/s), by a substring of the device name
SPECS = [("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
         ("A100-SXM4-80GB", 312e12, 2.039e12), ("A100 80GB PCIe", 312e12, 1.935e12), ("A100", 312e12, 1.555e12),
         ("L4", 121e12, 0.3e12)]


def pixtral_12b_args(small: bool) -> ModelArgs:
    vision = dict(hidden_size=1024, num_channels=3, max_image_size=1024, patch_size=16, rope_theta=10000.0,
                  intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_token_id=10,
                  image_break_token_id=12, image_end_token_id=13, adapter_bias=True)
    text = dict(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5,
                vocab_size=131072, rope_theta=1e9)
    if small:
        vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        text.update(dim=128, n_layers=2, head_dim=32, hidden_dim=256, n_heads=4, n_kv_heads=2, vocab_size=4096)
    return ModelArgs(**text, vision_encoder=VisionEncoderArgs(**vision))


class CompileReport(logging.Handler):
    """What torch.compile did during the run, from PyTorch's own log records: which FlexAttention
    kernel each compile chose (Inductor's flex-decoding kernel or its general one) and whether any
    function hit Dynamo's recompile limit, past which it would run eagerly (it must not)."""

    SOURCES = ("torch._inductor.kernel.flex.flex_decoding", "torch._dynamo.convert_frame")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.decoding = self.general = self.limit_hits = 0
        self.levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Use flex decoding"):
            if text.startswith("Use flex decoding True"):
                self.decoding += 1
            else:
                self.general += 1
        elif "hit config." in text and "recompile_limit" in text:
            self.limit_hits += 1

    def __enter__(self) -> "CompileReport":
        for name in self.SOURCES:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            self.levels[name] = logger.level
            if name.endswith("flex_decoding"):
                logger.setLevel(logging.DEBUG)  # the kernel choice is logged at debug level
        return self

    def __exit__(self, *exc) -> None:
        for name in self.SOURCES:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(self.levels[name])

    def summary(self) -> dict:
        return dict(flex_decoding_kernels=self.decoding, flex_general_kernels=self.general,
                    recompile_limit_hits=self.limit_hits)


@dataclass
class Peaks:
    flops: float
    bandwidth: float
    source: str


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of `repeat` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measured_peaks(device: torch.device, dtype: torch.dtype) -> Peaks:
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # bytes copied: 256 MiB / 16 MiB
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, 5)
    m = 8192 if device.type == "cuda" else 1024
    a = torch.randn(m, m, dtype=dtype, device=device)
    mm_s = timed(lambda: a @ a, device, 5)
    return Peaks(2 * m ** 3 / mm_s, 2 * n / copy_s, "measured here (copy bandwidth, one matmul)")


def peaks_for(device: torch.device, dtype: torch.dtype, force_measured: bool) -> Peaks:
    if device.type == "cuda" and not force_measured:
        name = torch.cuda.get_device_name(device)
        for key, flops, bandwidth in SPECS:
            if key in name:
                return Peaks(flops, bandwidth, f"published figures for {name}")
    return measured_peaks(device, dtype)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def image_prompt(args: ModelArgs, side_patches: int) -> list[int]:
    """[BOS], an image of side_patches^2 patches in rows with break/end tokens, a few text tokens."""
    v = args.vision_encoder
    tokens = [1]
    for row in range(side_patches):
        tokens += [v.image_token_id] * side_patches
        tokens.append(v.image_end_token_id if row == side_patches - 1 else v.image_break_token_id)
    return tokens + [1000 + i for i in range(10)]


def bench_decode(model, args: ModelArgs, device, dtype, peaks: Peaks, repeat: int, context: int) -> list[dict]:
    block_size = 16
    pages = -(-(context + 1) // block_size)
    runner = ModelRunner(model, pages * max(BATCHES), block_size, decode_batch_sizes=list(BATCHES), max_pages=pages)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    runner.execute(StepInput([], new_sequences={i: greedy for i in range(max(BATCHES))}))
    kv_token_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * torch.empty(0, dtype=dtype).element_size()
    weight_bytes = param_bytes(model.layers) + param_bytes(model.norm) + param_bytes(model.output)
    rows = []
    for batch in BATCHES:
        chunks = [SeqChunk(seq_id=i, token_ids=[1000], start=context - 1, sample=True,
                           block_table=list(range(i * pages, (i + 1) * pages)))
                  for i in range(batch)]
        step = StepInput(chunks)
        result = {}
        graphs, runner.graphs = runner.graphs, None
        result["eager"] = timed(lambda: runner.execute(step), device, repeat)
        runner.graphs = graphs
        if graphs is not None:
            result["graph path"] = timed(lambda: runner.execute(step), device, repeat)
        floor = (weight_bytes + batch * context * kv_token_bytes) / peaks.bandwidth
        best = min(result.values())
        how = "torch backend: eager only" if graphs is None else (
            "CUDA graphs captured" if graphs.captured else "static buffers, not captured")
        rows.append(dict(what=f"decode batch {batch} x {context} ctx", ms=best * 1e3, floor_ms=floor * 1e3,
                         ratio=best / floor, how=how, detail={k: round(v * 1e3, 3) for k, v in result.items()}))
    return rows


def bench_prefill(model, args: ModelArgs, device, dtype, peaks: Peaks, repeat: int, side: int) -> dict:
    tokens = image_prompt(args, side)
    block_size = 16
    pages = -(-len(tokens) // block_size)
    runner = ModelRunner(model, pages, block_size)
    v = args.vision_encoder
    feats = torch.randn(side * side, v.hidden_size, dtype=dtype, device=device)
    runner.execute(StepInput([], new_sequences={0: SamplingParams(max_tokens=1, temperature=0.0)},
                             new_images={0: [ImageFeatures(feats, (side, side))]}))
    step = StepInput([SeqChunk(seq_id=0, token_ids=tokens, start=0, block_table=list(range(pages)), sample=True)])
    seconds = timed(lambda: runner.execute(step), device, repeat)
    n = len(tokens)
    linear_params = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
    flops = 2 * linear_params * n + 2 * args.n_layers * args.n_heads * args.head_dim * n * n  # causal QK^T + PV
    flops += 2 * sum(p.numel() for p in model.vision_language_adapter.parameters()) * side * side
    floor = flops / peaks.flops
    return dict(what=f"prefill 1 image ({n} tokens)", ms=seconds * 1e3, floor_ms=floor * 1e3, ratio=seconds / floor)


def bench_vision(model, args: ModelArgs, device, dtype, peaks: Peaks, repeat: int, size: int) -> list[dict]:
    v = args.vision_encoder
    patches = (size // v.patch_size) ** 2
    linear_params = sum(p.numel() for p in model.vision_encoder.parameters() if p.dim() >= 2)
    rows = []
    for count in (1, 8):
        images = [torch.randn(3, size, size, dtype=dtype, device=device) for _ in range(count)]
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            seconds = timed(lambda: model.encode_images(images), device, repeat)
            peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        flops = count * (2 * linear_params * patches + 4 * v.num_hidden_layers * v.hidden_size * patches * patches)
        floor = flops / peaks.flops
        rows.append(dict(what=f"vision {count} x {size}x{size}", ms=seconds * 1e3, floor_ms=floor * 1e3,
                         ratio=seconds / floor, peak_gib=None if peak is None else peak / 2 ** 30))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small model and short contexts (a smoke run)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--measured-peaks", action="store_true",
                        help="floors from the copy bandwidth and matmul rate measured here, not published figures")
    parser.add_argument("--json", help="also write the rows to this file")
    ns = parser.parse_args()
    device = torch.device(ns.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = pixtral_12b_args(ns.small)
    context, side, image_size = (CONTEXT, 64, 1024) if not ns.small else (80, 8, 128)
    peaks = peaks_for(device, dtype, ns.measured_peaks)
    model = random_model(args, device, dtype)
    print(f"{'small shape' if ns.small else 'Pixtral-12B shape'}, {dtype}, on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; floors from {peaks.source}: "
          f"{peaks.bandwidth / 1e12:.3g} TB/s, {peaks.flops / 1e12:.3g} TFLOP/s")
    with CompileReport() as compiles:
        rows = bench_decode(model, args, device, dtype, peaks, ns.repeat, context)
        rows.append(bench_prefill(model, args, device, dtype, peaks, ns.repeat, side))
    rows += bench_vision(model, args, device, dtype, peaks, max(ns.repeat // 3, 1), image_size)
    print(f"{'':34} {'ms':>10} {'floor ms':>10} {'ratio':>7}  detail")
    for r in rows:
        detail = r.get("detail") or ("" if r.get("peak_gib") is None else f"peak {r['peak_gib']:.2f} GiB")
        if "how" in r:
            detail = f"ms {detail} ({r['how']})"
        print(f"{r['what']:34} {r['ms']:10.2f} {r['floor_ms']:10.3f} {r['ratio']:6.2f}x  {detail}")
    report = compiles.summary()
    print(f"FlexAttention kernels lowered in this run (Inductor's cache skips lowering): "
          f"{report['flex_decoding_kernels']} flex-decoding, {report['flex_general_kernels']} general; "
          f"recompile-limit hits: {report['recompile_limit_hits']} (any means an eager fallback)")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(dict(device=str(device), peaks=peaks.__dict__, rows=rows, compiles=report), f, indent=1)


if __name__ == "__main__":
    main()
