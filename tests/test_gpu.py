"""The GPU hot path on a GPU: parity with the CPU reference in bf16, CUDA graphs equal eager, and
the workloads that ran out of memory on PyTorch's math attention. Marked `gpu`: skipped without
CUDA (conftest). The parity test also runs on CPU (FlexAttention forced, padded decode batches
uncaptured), and the last test runs `benchmarks.gpu` small on CPU, so the code they share with the
GPU runs, and is checked, everywhere."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import torch

from benchmarks.gpu import CompileReport
from model import load_model
from model.engine.local_executor import build_local_engine
from model.engine.model_runner import ImageFeatures, ModelRunner, SeqChunk, StepInput, profile_forward
from model.engine.sampling_params import SamplingParams
from model.layers.attention import BACKEND_ENV
from tests.helpers import encode_chat, image_features, random_image

PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, top_logprobs=5)


def prompts(checkpoint, model):
    specs = [["Hi"], ["Describe this", random_image(40, 30, 1)], ["Tell me about lighthouses " * 6],
             [random_image(90, 50, 2), "and", random_image(20, 64, 3), "compare them"], ["Short one"]]
    out = []
    for i, parts in enumerate(specs):
        tokens, pixels = encode_chat(checkpoint, parts)
        out.append((f"r{i}", tokens, image_features(model, pixels)))
    return out


def tokens_and_logprobs(engine, reqs, device: str):
    for rid, tokens, feats in reqs:
        feats = [ImageFeatures(f.features.to(device), f.grid) for f in feats]
        engine.add_request(rid, tokens, PARAMS, feats, [f"{rid}-{k}" for k in range(len(feats))])
    return {rid: [(t, lp.logprob, dict(lp.top)) for o in outs for t, lp in zip(o.token_ids, o.logprobs)]
            for rid, outs in engine.run_to_completion().items()}


def assert_close_runs(got, expected, atol: float) -> None:
    """Each request's greedy tokens are equal, with logprobs within `atol`, up to a step where the two
    runs chose different tokens from a near tie. Random weights give flat distributions with many
    near ties, and rounding in another dtype (bf16 against fp32) or another kernel (a padded batch
    takes other GEMM tiles) breaks some of them the other way: on CPU, bf16 turns one of these
    requests at its 7th token, by 0.005 in logprob. At such a step each run must give the other's
    token the logprob the other gave it, within `atol` (so only the argmax of a near tie moved);
    past it the two texts differ, and nothing more is compared."""
    for rid, reference in expected.items():
        assert len(got[rid]) == len(reference), rid
        for step, ((token, logprob, top), (ref_token, ref_logprob, ref_top)) in enumerate(zip(got[rid], reference)):
            if token != ref_token:
                assert ref_token in top and token in ref_top, (rid, step, top, ref_top)
                assert abs(top[ref_token] - ref_logprob) <= atol and abs(ref_top[token] - logprob) <= atol, \
                    (rid, step, top, ref_top)
                break
            assert abs(logprob - ref_logprob) <= atol, (rid, step, logprob, ref_logprob)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"])
def test_bf16_engine_matches_the_cpu_reference_and_graphs_equal_eager(mistral_12b, device, monkeypatch):
    """The engine in bf16 (FlexAttention, decode from captured CUDA graphs) gives the CPU fp32
    engine's greedy tokens, with logprobs within bf16 error; and the same engine without graphs
    gives the graphs' tokens. On CPU the same path runs with FlexAttention forced and the padded
    decode batches uncaptured: it checks this test's own comparison where CI can run it."""
    cpu_model = load_model(mistral_12b)
    reqs = prompts(mistral_12b, cpu_model)
    reference = tokens_and_logprobs(build_local_engine(mistral_12b, model=cpu_model, num_blocks=256), reqs, "cpu")
    monkeypatch.setenv(BACKEND_ENV, "flex")
    bf16_model = load_model(mistral_12b, device=device, dtype=torch.bfloat16, with_vision_encoder=False)
    graphs = build_local_engine(mistral_12b, model=bf16_model, num_blocks=256, decode_batch_sizes=[1, 2, 4, 8])
    runner = graphs.executor.runner
    assert runner.attention_backend == "flex" and runner.graphs is not None
    assert runner.graphs.captured == (device == "cuda")
    with CompileReport() as compiles:
        with_graphs = tokens_and_logprobs(graphs, reqs, device)
        eager = tokens_and_logprobs(build_local_engine(mistral_12b, model=bf16_model, num_blocks=256), reqs, device)
    assert_close_runs(with_graphs, reference, atol=0.05)
    # the same bf16 weights, but other GEMM tiles for a padded batch: the logits are rounded to bf16,
    # whose step at this model's top logits (4 to 8) is 2**-5, so one step apart must pass
    assert_close_runs(eager, with_graphs, atol=0.05)
    assert compiles.limit_hits == 0  # no kernel fell back to eager FlexAttention


def full_size_model(**text_overrides):
    from benchmarks.gpu import pixtral_12b_args
    from model.tiny import random_model

    args = pixtral_12b_args(small=False)
    return random_model(dataclasses.replace(args, **text_overrides), "cuda", torch.bfloat16)


@pytest.mark.gpu
def test_vision_encoder_takes_8_images_of_1024_within_24_gib():
    """Pixtral-12B's vision encoder (full size) on 8 images of 1024x1024 in one forward: 32,768
    patches, which a dense mask with the math backend's fp32 scores would need ~70 GB for."""
    model = full_size_model(n_layers=1, dim=128, head_dim=32, n_heads=4, n_kv_heads=2, hidden_dim=256,
                            vocab_size=1024)
    images = [torch.randn(3, 1024, 1024, dtype=torch.bfloat16, device="cuda") for _ in range(8)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        features, grids = model.encode_images(images)
    torch.cuda.synchronize()
    assert features.shape[0] == 8 * 64 * 64 and grids == [(64, 64)] * 8
    assert torch.cuda.max_memory_allocated() - before < 24 * 2 ** 30


@pytest.mark.gpu
def test_a_long_image_prefill_and_the_profiling_pass_stay_small_at_12b_width():
    """At Pixtral-12B's width (4 of its 40 layers: activations do not add up across layers), one
    1024x1024 image plus 250 text tokens prefilled as one chunk, and the profiling pass at 8,192
    tokens, each stay within 2 GiB of activations: FlexAttention keeps no score matrix (the math
    backend's fp32 scores alone were 2.2 GB for the prefill)."""
    model = full_size_model(n_layers=4)
    args = model.args
    v = args.vision_encoder
    tokens = [1] + ([v.image_token_id] * 64 + [v.image_break_token_id]) * 63 + [v.image_token_id] * 64
    tokens += [v.image_end_token_id] + [1000 + i for i in range(250)]
    pages = -(-len(tokens) // 16)
    runner = ModelRunner(model, pages, 16)
    assert runner.attention_backend == "flex"
    feats = torch.randn(64 * 64, v.hidden_size, dtype=torch.bfloat16, device="cuda")
    runner.execute(StepInput([], new_sequences={0: SamplingParams(max_tokens=1, temperature=0.0)},
                             new_images={0: [ImageFeatures(feats, (64, 64))]}))
    for run in (lambda: runner.execute(StepInput([SeqChunk(0, tokens, 0, list(range(pages)), True)])),
                lambda: profile_forward(model, 8192)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < 2 * 2 ** 30


def test_the_gpu_benchmark_runs_small_on_cpu():
    """`benchmarks.gpu` imports only torch and model/, and its measurements and floors run end to end
    (a small shape on CPU: the figures mean nothing here)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--small", "--repeat", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {}
    for line in done.stdout.splitlines():
        found = re.match(r"(\S.*?)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)x", line)
        if found:
            ms, floor, ratio = map(float, found.groups()[1:])
            assert ms > 0 and floor > 0 and ratio == pytest.approx(ms / floor, rel=0.05, abs=0.01), line
            rows[found.group(1)] = ratio
    assert sorted(rows) == sorted(["decode batch 1 x 80 ctx", "decode batch 8 x 80 ctx", "decode batch 32 x 80 ctx",
                                   "prefill 1 image (83 tokens)", "vision 1 x 128x128", "vision 8 x 128x128"])
    assert "recompile-limit hits: 0 " in done.stdout
    imports = subprocess.run([sys.executable, "-c", "import sys, benchmarks.gpu; print('ray' in sys.modules)"],
                             capture_output=True, text=True)
    assert imports.stdout.strip() == "False"
