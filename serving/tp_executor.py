"""Tensor-parallel decoder ranks as Ray actors in one placement group.

The engine (plain Python, in the decoder replica) puts each step's `StepInput` in the object store
once (image features included) and calls `execute` on every rank with that reference. Block tables
travel as deltas (`TableSender` / `TableReceiver`): a long sequence's table is sent once, then
only the pages it gains. Grammar masks go to rank 0 alone, the only rank that samples. The ranks
run their shards in lock-step, joined by torch.distributed (gloo on CPU, NCCL on CUDA), and rank
0's sampled tokens come back. One bundle per rank: a GPU bundle on GPU nodes, a CPU bundle on CPU.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, replace

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from model.config import load_model_args
from model.engine.llm_engine import ExecutorDeadError, LLMEngine
from model.engine.local_executor import KVBudget, engine_config_for, grammar_compiler, tokenizer_decode
from model.engine.model_runner import ModelRunner, StepInput, StepOutput
from model.loader import load_model
from model.parallel import init_distributed
from serving.logs import setup_logging


@dataclass
class RankResources:
    device: str = "cpu"  # "cpu" or "cuda"
    cpus_per_rank: float = 1.0
    gpus_per_rank: float = 0.0  # what each rank asks Ray for on CUDA: one GPU each, shared at most with a vision replica
    cpu_threads: int | None = None  # torch threads per rank on CPU; default: its whole CPUs, at least 1

    def __post_init__(self) -> None:
        if self.device == "cuda" and not self.gpus_per_rank:
            self.gpus_per_rank = 1.0


def placement_bundles(tensor_parallel_size: int, resources: RankResources) -> list[dict[str, float]]:
    """One bundle per rank, each holding that rank's device."""
    bundle = {"CPU": resources.cpus_per_rank}
    if resources.gpus_per_rank:
        bundle["GPU"] = resources.gpus_per_rank
    return [dict(bundle) for _ in range(tensor_parallel_size)]


@dataclass
class TableDelta:
    """A sequence's block table as a rank rebuilds it: the first `keep` pages of its copy, then `append`."""

    keep: int
    append: list[int]


class TableSender:
    """Replaces each chunk's block table by the change since the ranks last saw it (the engine side).

    Tables grow a page at a time, so a decode step sends a page or nothing. A table that changed
    otherwise (a preempted sequence's new pages) keeps only its common prefix. Must see every step
    the ranks see, in order: a failed step stops the whole group (RayTPExecutor), so the two sides
    never part."""

    def __init__(self) -> None:
        self.sent: dict[int, list[int]] = {}

    def encode(self, step: StepInput) -> StepInput:
        chunks = []
        for c in step.chunks:
            old, new = self.sent.get(c.seq_id, []), c.block_table
            keep = len(old) if new[:len(old)] == old else _common_prefix(old, new)
            chunks.append(replace(c, block_table=TableDelta(keep, new[keep:])))
            self.sent[c.seq_id] = list(new)
        for seq_id in step.finished:
            self.sent.pop(seq_id, None)
        return replace(step, chunks=chunks)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class TableReceiver:
    """Rebuilds the block tables from TableSender's deltas (each rank's side)."""

    def __init__(self) -> None:
        self.tables: dict[int, list[int]] = {}

    def decode(self, step: StepInput) -> StepInput:
        chunks = []
        for c in step.chunks:
            delta: TableDelta = c.block_table
            table = self.tables.get(c.seq_id, [])[:delta.keep] + delta.append
            self.tables[c.seq_id] = table
            chunks.append(replace(c, block_table=table))
        for seq_id in step.finished:
            self.tables.pop(seq_id, None)
        return replace(step, chunks=chunks)


def split_masks(step: StepInput) -> tuple[StepInput, list | None]:
    """The step without its grammar masks, and the masks (one per chunk, None where it has none; None
    when no chunk has one). Only rank 0 samples, so only rank 0 is sent the masks."""
    masks = [c.allowed for c in step.chunks]
    if all(m is None for m in masks):
        return step, None
    return replace(step, chunks=[replace(c, allowed=None) for c in step.chunks]), masks


def join_masks(step: StepInput, masks: list | None) -> StepInput:
    if masks is None:
        return step
    return replace(step, chunks=[replace(c, allowed=m) for c, m in zip(step.chunks, masks)])


def visible_index(gpu_id: int | str, visible: str | None) -> int:
    """The CUDA device index of the GPU Ray assigned: its place in CUDA_VISIBLE_DEVICES when the node
    sets one (Ray's ids are taken from that list), else the id itself."""
    if visible:
        return [d.strip() for d in visible.split(",")].index(str(gpu_id))
    return int(gpu_id)


def rank_runtime_env(resources: RankResources) -> dict:
    """On CUDA, Ray must not narrow CUDA_VISIBLE_DEVICES to the rank's own GPU (see RankWorker)."""
    if resources.device != "cuda":
        return {}
    return {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}


@ray.remote
class RankWorker:
    def __init__(self, checkpoint: str, rank: int, world_size: int, init_method: str, device: str,
                 dtype: str, cpu_threads: int, tokenizer: str | None = None) -> None:
        setup_logging()
        self.gpu: int | None = None
        if device == "cpu":
            torch.set_num_threads(cpu_threads)
        else:
            # The actor sees every GPU of its node (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES, set
            # by RayTPExecutor): masking each rank to its own GPU hides the peers that NCCL's
            # peer-to-peer paths over NVLink/NVSwitch need. So each rank selects the GPU Ray gave it.
            self.gpu = visible_index(ray.get_gpu_ids()[0], os.environ.get("CUDA_VISIBLE_DEVICES"))
            torch.cuda.set_device(self.gpu)
        backend = "nccl" if device == "cuda" else "gloo"
        self.tp = init_distributed(rank, world_size, init_method, backend)
        self.model = load_model(checkpoint, device=device, dtype=getattr(torch, dtype), tp=self.tp,
                                with_vision_encoder=False, tokenizer=tokenizer)
        self.runner: ModelRunner | None = None
        self.tables = TableReceiver()

    def ready(self) -> bool:
        return True

    def num_blocks(self, budget: KVBudget, block_size: int) -> int:
        self._on_my_gpu()
        return budget.num_blocks(self.model, block_size)

    def _on_my_gpu(self) -> None:
        """The current CUDA device is per thread: a plain actor runs every method on the thread that
        ran __init__, but concurrency groups would move them to others, which would start on GPU 0."""
        if self.gpu is not None:
            torch.cuda.set_device(self.gpu)

    def init_cache(self, num_blocks: int, block_size: int, decode_batch_sizes: list[int] | None = None,
                   max_pages: int | None = None) -> None:
        self._on_my_gpu()
        self.runner = ModelRunner(self.model, num_blocks, block_size, decode_batch_sizes, max_pages)

    def execute(self, step: StepInput, masks: list | None = None) -> StepOutput:
        self._on_my_gpu()
        return self.runner.execute(join_masks(self.tables.decode(step), masks))

    def full_logits(self, tokens: list[int]) -> torch.Tensor:
        """Cache-free logits of a text prompt, for parity checks between parallel sizes."""
        return self.model.logits_no_cache(torch.tensor(tokens, device=self.model.tok_embeddings.weight.device)).cpu()


def _free_port_and_ip() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


class RayTPExecutor:
    def __init__(self, checkpoint: str, tensor_parallel_size: int, resources: RankResources, dtype: str = "float32",
                 kv: KVBudget | None = None, block_size: int = 16, pg: PlacementGroup | None = None,
                 first_bundle: int = 0, tokenizer: str | None = None, decode_batch_sizes: list[int] | None = None,
                 max_model_len: int | None = None, step_timeout_s: float = 300.0) -> None:
        size = tensor_parallel_size
        self.step_timeout_s = step_timeout_s
        self.owns_pg = pg is None
        self.pg = pg or placement_group(placement_bundles(size, resources),
                                        strategy="STRICT_PACK" if resources.gpus_per_rank else "PACK")
        ray.get(self.pg.ready(), timeout=600)
        ip, port = ray.get(ray.remote(num_cpus=0)(_free_port_and_ip).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=first_bundle)
        ).remote())
        host = f"[{ip}]" if ":" in ip else ip  # an IPv6 address goes in brackets in a URL
        threads = resources.cpu_threads or max(int(resources.cpus_per_rank), 1)
        group = uuid.uuid4().hex[:8]  # names the ranks of this group, for operators and tests
        self.workers = [
            RankWorker.options(
                name=f"pixtral-tp-rank{r}-{group}", num_cpus=resources.cpus_per_rank, num_gpus=resources.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=first_bundle + r),
                runtime_env=rank_runtime_env(resources),
            ).remote(checkpoint, r, size, f"tcp://{host}:{port}", resources.device, dtype, threads, tokenizer)
            for r in range(size)
        ]
        # Every rank has loaded its weights before any starts the profiling pass: its first
        # collective sets up NCCL, which waits for the slowest rank at most the group's timeout
        # (parallel.py), and ranks reading from shared storage can finish loading minutes apart.
        ray.get([w.ready.remote() for w in self.workers])
        budget = kv or KVBudget()
        self.num_blocks = min(ray.get([w.num_blocks.remote(budget, block_size) for w in self.workers]))
        self.tables = TableSender()
        max_pages = -(-max_model_len // block_size) if max_model_len else None
        ray.get([w.init_cache.remote(self.num_blocks, block_size, decode_batch_sizes, max_pages)
                 for w in self.workers])

    def execute(self, step: StepInput) -> StepOutput:
        """Every failure here stops the group: a rank that raised may have left the others waiting
        in a collective, so no later step could be trusted to line up (ExecutorDeadError)."""
        shared, masks = split_masks(self.tables.encode(step))
        step_ref = ray.put(shared)  # serialised once, read by every rank
        refs = [w.execute.remote(step_ref, masks if rank == 0 else None) for rank, w in enumerate(self.workers)]
        # Fail fast: if one rank dies, the others wait in a collective forever; do not wait on them.
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=self.step_timeout_s)
                if not ready:
                    raise TimeoutError(f"a tensor-parallel step took over {self.step_timeout_s}s")
                ray.get(ready[0])  # raises if that rank failed
            return ray.get(refs[0])  # rank 0 samples; the other ranks return empty outputs
        except Exception as exc:
            raise ExecutorDeadError(f"a tensor-parallel rank failed: {type(exc).__name__}") from exc

    def full_logits(self, tokens: list[int]) -> torch.Tensor:
        return ray.get([w.full_logits.remote(tokens) for w in self.workers])[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        if self.owns_pg:
            ray.util.remove_placement_group(self.pg)


def build_tp_engine(checkpoint: str, tensor_parallel_size: int, resources: RankResources, dtype: str = "float32",
                    kv: KVBudget | None = None, block_size: int = 16, pg: PlacementGroup | None = None,
                    first_bundle: int = 0, tokenizer: str | None = None, decode_batch_sizes: list[int] | None = None,
                    step_timeout_s: float = 300.0, **engine_overrides) -> tuple[LLMEngine, RayTPExecutor]:
    """An engine whose model runs on `tensor_parallel_size` Ray actors (in bundles first_bundle...)."""
    args = load_model_args(checkpoint, tokenizer)
    executor = RayTPExecutor(checkpoint, tensor_parallel_size, resources, dtype, kv, block_size, pg, first_bundle,
                             tokenizer, decode_batch_sizes,
                             engine_overrides.get("max_model_len", args.max_position_embeddings), step_timeout_s)
    decode, eos = tokenizer_decode(checkpoint, tokenizer)
    config = engine_config_for(args, executor.num_blocks, eos, block_size=block_size, **engine_overrides)
    return LLMEngine(executor, config, decode, grammar_compiler(checkpoint, args, tokenizer)), executor
