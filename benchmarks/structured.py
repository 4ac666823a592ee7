"""Decode throughput with a json_schema constraint against the same requests unconstrained, side by side.

    python -m benchmarks.structured                     # dim 1024, 8 layers, real 131k vocab (tekken)
    python -m benchmarks.structured --concurrency 8 --rounds 3 --shape large

Each round runs the same `concurrency` requests twice through one engine: once with a json_schema
grammar (llguidance masks every step) and once without. Sampling at temperature 1 with one seed
per request; after the prefill, --output decode steps are timed (ignore_eos; a grammar that
completes early ends its request, so the constrained runs count the tokens they produced). Prints output
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
    """Decode `n` requests for `output` steps together; returns (tokens made, seconds).

    Steady-state decoding at concurrency `n`: the budget is far beyond the steps run, so the
    engine's closing of JSON near the end of a budget does not shorten the constrained requests
    (a request whose grammar completes still ends, and counts the tokens it made). What is left
    is aborted after the steps."""
    ids = [f"r{seed}-{i}-{grammar is not None}" for i in range(n)]
    for i, rid in enumerate(ids):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=output * 4, temperature=1.0, seed=seed * 1000 + i,
                                                       ignore_eos=True, grammar=grammar))
    engine.step()  # the prefill, and each request's first token
    tokens = 0
    started = time.perf_counter()
    for _ in range(output - 1):
        if not engine.has_unfinished:
            break
        tokens += sum(len(o.token_ids) for o in engine.step())
    elapsed = time.perf_counter() - started
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished:
        engine.step()
    return tokens, elapsed


def closing_cost(engine, grammar: str) -> float:
    """Seconds for one closing plan, from inside the schema's first string."""
    matcher = engine.grammars.matcher(grammar)
    prefix = engine.grammars.tokenizer.tokenize_str('{"title":"A red bicycle')
    assert matcher.consume_tokens(prefix), matcher.get_error()
    engine.grammars.closing_plan(matcher, 64)
    started = time.perf_counter()
    for _ in range(100):
        engine.grammars.closing_plan(matcher, 64)
    return (time.perf_counter() - started) / 100


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
        closing = closing_cost(engine, grammar)
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
    print(f"  closing plan (each constrained row's check in the last 64 tokens of its budget): "
          f"{closing * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
