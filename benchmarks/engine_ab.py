"""This tree's engine against an earlier commit's, side by side, on the same checkpoint and requests.

    python -m benchmarks.engine_ab --base 7e4afc5 [--concurrency 1 8 32] [--rounds 2] [--temperature 0.8]
        [--top-p 0.9]

The base commit is exported with `git archive` to a temporary folder. Each measurement runs in
its own process, alternating base and head for --rounds rounds, so both see the same slow
minutes of a noisy machine; the best round of each counts. Requests as in benchmarks/engine.py
(prompts of --prompt +-25% tokens, outputs of --output +-50%), all submitted together. With
--temperature above 0 the requests sample (seeded, with --top-p if given), else they are greedy.
Prints output tokens/s per concurrency and head / base.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# runs inside either tree: only APIs both have
WORKER = """
import json, sys, time, torch
from model.engine.local_executor import build_local_engine
from model.engine.sampling_params import SamplingParams
from benchmarks.engine import prompts_for, output_lengths
ckpt, prompt, output, temperature, top_p, *levels = sys.argv[1:]
engine = build_local_engine(ckpt, num_blocks=2048)
result = {}
for c in map(int, levels):
    prompts, lengths = prompts_for(c, int(prompt), seed=c), output_lengths(c, int(output), False, seed=c)
    for warm in (True, False):
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            params = SamplingParams(max_tokens=n, temperature=float(temperature), top_p=float(top_p), seed=i,
                                    ignore_eos=True)
            engine.add_request(f"{c}-{warm}-{i}", p, params)
        made = sum(len(o.token_ids) for outs in engine.run_to_completion().values() for o in outs)
        result[c] = made / (time.perf_counter() - start)
print(json.dumps(result))
"""


def measure(tree: Path, ckpt: str, ns: argparse.Namespace) -> dict[int, float]:
    out = subprocess.run([sys.executable, "-c", WORKER, ckpt, str(ns.prompt), str(ns.output), str(ns.temperature),
                          str(ns.top_p), *map(str, ns.concurrency)], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    ns = parser.parse_args()
    from model.tiny import make_tiny_checkpoint

    head = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "-C", str(head), "archive", ns.base], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        sizes = dict(dim=ns.dim, n_layers=ns.layers, head_dim=128, n_heads=ns.dim // 128, n_kv_heads=2,
                     hidden_dim=4 * ns.dim)  # as benchmarks/engine.py
        ckpt = str(make_tiny_checkpoint(Path(tmp) / "ckpt", shape="12b", overrides=sizes))
        best: dict[str, dict[int, float]] = {"base": {}, "head": {}}
        for _ in range(ns.rounds):
            for name, tree in (("base", base), ("head", head)):
                for c, rate in measure(tree, ckpt, ns).items():
                    best[name][c] = max(best[name].get(c, 0.0), rate)
    mode = f"sampled at T={ns.temperature}, top_p={ns.top_p}" if ns.temperature else "greedy"
    print(f"dim {ns.dim} x {ns.layers} layers, prompts ~{ns.prompt}, outputs ~{ns.output}, {mode}, best of {ns.rounds}")
    print(f"{'concurrency':>11} {'base tok/s':>11} {'head tok/s':>11} {'head/base':>10}")
    for c in ns.concurrency:
        b, h = best["base"][c], best["head"][c]
        print(f"{c:11d} {b:11.1f} {h:11.1f} {h / b:9.2f}x")


if __name__ == "__main__":
    main()
