"""Decode throughput with a json_schema constraint against the same requests unconstrained, side by side.

    python -m benchmarks.structured                     # dim 1024, 8 layers, real 131k vocab (tekken)
    python -m benchmarks.structured --concurrency 8 --rounds 3 --shape large

Each round runs the same `concurrency` requests twice through one engine: once with a json_schema
grammar (llguidance masks every step) and once without. Sampling at temperature 1 with one seed
per request, and every request asks for exactly --output tokens (ignore_eos; a grammar that completes
early ends its request, so the constrained runs count the tokens they produced). Prints output
tokens/s for both and the ratio (target: constrained >= 0.8x), and how long compiling the schema
took the first time and when it was already cached.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from model.engine.guided import json_grammar
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from model.tiny import make_tiny_checkpoint

# nesting, an array of objects, enums, bounded numbers and strings, optional keys: a schema of the
# kind applications send
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["indoor", "outdoor", "people", "animal", "text"]}},
        "objects": {"type": "array", "items": {"type": "object", "properties": {
            "label": {"type": "string", "maxLength": 20}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["label", "count"]}},
        "caption": {"type": "string"},
    },
    "required": ["title", "rating", "tags", "objects"],
}


def run(engine, prompt: list[int], n: int, output: int, grammar: str | None, seed: int) -> tuple[int, float]:
    for i in range(n):
        engine.add_request(f"r{seed}-{i}-{grammar is not None}", prompt,
                           SamplingParams(max_tokens=output, temperature=1.0, seed=seed * 1000 + i, ignore_eos=True,
                                          grammar=grammar))
    started = time.perf_counter()
    outputs = engine.run_to_completion()
    elapsed = time.perf_counter() - started
    return sum(len(o.token_ids) for outs in outputs.values() for o in outs), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shape", choices=["12b", "large"], default="12b")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        heads = max(ns.dim // 128, 1)
        ckpt = make_tiny_checkpoint(tmp, shape=ns.shape, overrides={
            "dim": ns.dim, "n_layers": ns.layers, "head_dim": 128, "n_heads": heads,
            "n_kv_heads": max(heads // 4, 1), "hidden_dim": 4 * ns.dim})
        engine = build_local_engine(ckpt, num_blocks=1024, max_model_len=4096)
        grammar = json_grammar(SCHEMA)
        engine.grammars.tokenizer  # the vocabulary, built once per process: not a per-schema cost
        started = time.perf_counter()
        engine.grammars.compile(grammar)
        first_compile = time.perf_counter() - started
        started = time.perf_counter()
        engine.grammars.matcher(grammar)
        cached = time.perf_counter() - started
        prompt = [1] + list(range(1500, 1600))
        run(engine, prompt, ns.concurrency, 8, grammar, seed=99)  # warm-up, both paths
        run(engine, prompt, ns.concurrency, 8, None, seed=99)
        free, constrained = [], []
        for r in range(ns.rounds):  # interleaved: the machine's noise hits both alike
            tokens, seconds = run(engine, prompt, ns.concurrency, ns.output, None, seed=r)
            free.append(tokens / seconds)
            tokens, seconds = run(engine, prompt, ns.concurrency, ns.output, grammar, seed=r)
            constrained.append(tokens / seconds)
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"dim {ns.dim}, {ns.layers} layers, {ns.shape} tokenizer, concurrency {ns.concurrency}, "
          f"{ns.output} tokens each, median of {ns.rounds} rounds")
    print(f"  unconstrained  {f:8.1f} tokens/s")
    print(f"  json_schema    {c:8.1f} tokens/s   ratio {c / f:.2f}x (target >= 0.8x)")
    print(f"  schema compile: first {first_compile * 1e3:.1f} ms, cached {cached * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
