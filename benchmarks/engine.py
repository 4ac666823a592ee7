"""Engine throughput against transformers' `generate` on the same random weights, side by side.

    python benchmarks/engine.py                      # dim 1024, 8 layers, real 131k vocab
    python benchmarks/engine.py --output 32 --concurrency 1 8 32

For each concurrency c, the same c requests run four ways:
  ours        all c submitted together to the engine (continuous batching, paged KV cache)
  ours-blas   the same, with the CPU weight packing turned off (the plain matmul transformers uses),
              to separate what the scheduler wins from what the packed oneDNN matmul wins
  hf-serial   transformers generate, one request at a time (measured on min(c, --serial-cap) of them)
  hf-batch    transformers generate on one left-padded batch of all c prompts
and the table prints output tokens/s and the ratios. Greedy, fp32, CPU.

Requests differ as real traffic does: prompt lengths are spread over +-25% of --prompt and each
request asks for its own max_tokens, spread over +-50% of --output (mean --output). Only the
tokens each request asked for count. A padded batch must run until its longest request is done,
so its finished rows do wasted work, which continuous batching avoids; --equal-lengths gives
every request exactly --output tokens to show the case where that advantage is absent.
Absolute numbers depend on the machine; the ratios are the result.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from model import load_model
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from model.layers.linear import pack_linear_weights
from model.tiny import make_tiny_checkpoint


def prompts_for(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length * 3 // 4, length * 5 // 4 + 1, (n,), generator=gen)
    # ordinary vocabulary ids (the first 1000 of tekken are control tokens)
    return [[1] + torch.randint(1000, 131072, (int(k) - 1,), generator=gen).tolist() for k in lengths]


def output_lengths(n: int, output: int, equal: bool, seed: int) -> list[int]:
    if equal:
        return [output] * n
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(output // 2, output * 3 // 2 + 1, (n,), generator=gen).tolist()


@contextmanager
def unpacked(model) -> Iterator[None]:
    """Run the model's linear layers on the plain matmul path for a while."""
    pack_linear_weights(model, enabled=False)
    try:
        yield
    finally:
        pack_linear_weights(model)


def run_ours(engine, prompts: list[list[int]], lengths: list[int]) -> float:
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(f"b{time.perf_counter_ns()}-{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    results = engine.run_to_completion()
    elapsed = time.perf_counter() - start
    made = sum(len(o.token_ids) for outs in results.values() for o in outs)
    assert made == sum(lengths), (made, sum(lengths))
    return made / elapsed


def hf_generate(hf, batch: list[list[int]], lengths: list[int]) -> float:
    """One generate call; the batch runs to its longest request, the requested tokens count."""
    output = max(lengths)
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, p in enumerate(batch):  # left padding, as decoder-only batching needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output, min_new_tokens=output,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == output, out.shape
    return sum(lengths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--serial-cap", type=int, default=8, help="hf-serial measures at most this many requests")
    parser.add_argument("--equal-lengths", action="store_true", help="every request makes exactly --output tokens")
    ns = parser.parse_args()

    from transformers import LlavaForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        sizes = dict(dim=ns.dim, n_layers=ns.layers, head_dim=128, n_heads=ns.dim // 128, n_kv_heads=2,
                     hidden_dim=4 * ns.dim)
        ckpt = make_tiny_checkpoint(tmp, fmt="hf", shape="12b", overrides=sizes)
        ours_model = load_model(ckpt, with_vision_encoder=False)
        hf = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        n_params = sum(p.numel() for p in ours_model.parameters()) / 1e6
        print(f"model: dim {ns.dim}, {ns.layers} layers, vocab 131072, {n_params:.0f}M decoder params, fp32, "
              f"{torch.get_num_threads()} threads; prompts ~{ns.prompt} tokens, "
              f"{'exactly' if ns.equal_lengths else 'on average'} {ns.output} output tokens each")
        rows = []
        for c in ns.concurrency:
            prompts = prompts_for(c, ns.prompt, seed=c)
            lengths = output_lengths(c, ns.output, ns.equal_lengths, seed=c)
            engine = build_local_engine(ckpt, model=ours_model, num_blocks=c * (ns.prompt * 2 + ns.output * 2) // 16 + 64,
                                        enable_prefix_caching=False, max_num_seqs=max(c, 1))
            run_ours(engine, prompts[:1], [4])  # warm-up
            ours = run_ours(engine, prompts, lengths)
            with unpacked(ours_model):
                blas = run_ours(engine, prompts, lengths)
            pairs = list(zip(prompts, lengths))[:ns.serial_cap]
            serial_time = sum(n / hf_generate(hf, [p], [n]) for p, n in pairs)
            serial = sum(n for _, n in pairs) / serial_time
            batch = hf_generate(hf, prompts, lengths)
            rows.append((c, ours, blas, serial, batch))
            print(f"  c={c}: ours {ours:.1f} tok/s, ours-blas {blas:.1f}, hf-serial {serial:.1f}, "
                  f"hf-batch {batch:.1f}", flush=True)
    print()
    print("| concurrency | ours tok/s | ours-blas tok/s | hf one-at-a-time tok/s | hf padded batch tok/s "
          "| ours / one-at-a-time | ours / padded batch | ours-blas / padded batch |")
    print("|---|---|---|---|---|---|---|---|")
    for c, ours, blas, serial, batch in rows:
        print(f"| {c} | {ours:.1f} | {blas:.1f} | {serial:.1f} | {batch:.1f} | {ours / serial:.2f}x "
              f"| {ours / batch:.2f}x | {blas / batch:.2f}x |")


if __name__ == "__main__":
    main()
