"""Run the model in this process (tensor parallel size 1), and build a ready engine from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ModelArgs
from model.engine.llm_engine import EngineConfig, ExecutorDeadError, LLMEngine
from model.engine.model_runner import ModelRunner, StepInput, StepOutput, kv_block_bytes, profile_forward
from model.loader import load_model
from model.pixtral import PixtralModel

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class KVBudget:
    """How much memory the paged KV cache may take: on CUDA, what a profiling pass leaves of
    gpu_memory_utilization x the GPU; on CPU, a fixed number of bytes.

    `profile_tokens`: the largest step the scheduler may run (max_num_batched_tokens). On CUDA one
    cache-free forward of that many tokens, an image's worth of them image embeddings, runs before
    the cache is sized, so its activation peak stays free; on a tensor-parallel rank it also warms
    NCCL, whose buffers are then counted as in use.
    """

    gpu_memory_utilization: float = 0.9
    cpu_bytes: int = DEFAULT_CPU_KV_BYTES
    profile_tokens: int = 0

    def num_blocks(self, model: PixtralModel, block_size: int) -> int:
        weight = model.tok_embeddings.weight
        per_block = kv_block_bytes(model, block_size, weight.dtype)
        if weight.device.type != "cuda":
            return _blocks_or_fail(self.cpu_bytes, per_block, block_size, 1,
                                   lambda: f"kv_cache_bytes is {self.cpu_bytes / 2**20:.0f} MiB")
        device = weight.device
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        if self.profile_tokens:
            profile_forward(model, self.profile_tokens)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = cuda_kv_budget(total, free, peak, self.gpu_memory_utilization)
        return _blocks_or_fail(budget, per_block, block_size, self.profile_tokens, lambda: (
            f"{self.gpu_memory_utilization} x {total / 2**30:.1f} GiB, less {(total - free) / 2**30:.1f} GiB in use "
            f"(weights, CUDA context, NCCL) and a {peak / 2**30:.1f} GiB activation peak for a "
            f"{self.profile_tokens}-token step"))


def cuda_kv_budget(total: int, free: int, activation_peak: int, utilization: float) -> int:
    """Bytes left for the KV cache: utilization x the GPU, less what is in use now and the peak."""
    return int(utilization * total - (total - free) - activation_peak)


def _blocks_or_fail(budget: float, per_block: int, block_size: int, need_tokens: int, why) -> int:
    """Whole blocks in the budget; fail at startup, naming the numbers and the knobs, when they
    cannot hold one step's tokens."""
    blocks = int(max(budget, 0) // per_block)
    if blocks * block_size < max(need_tokens, 1):
        raise MemoryError(
            f"no room for the KV cache: {budget / 2**20:.0f} MiB left ({why()}); one {block_size}-token block "
            f"takes {per_block / 2**20:.2f} MiB, and a step needs {max(need_tokens, 1)} tokens. Lower "
            "decoder.max_num_batched_tokens, raise decoder.gpu_memory_utilization (GPU) or "
            "decoder.kv_cache_bytes (CPU), or shard the model over more tensor_parallel_size ranks")
    return blocks


# A CUDA error other than out-of-memory leaves the context unusable ("sticky"): no later step can
# succeed in this process, so the engine must stop and the replica be replaced.
DEVICE_FATAL_MARKERS = ("CUDA error", "CUDA driver error", "Triton Error [CUDA]", "CUBLAS_STATUS", "cuDNN error",
                        "NCCL error", "device-side assert", "illegal memory access")


def is_device_fatal(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return False  # the allocator recovers; the step that asked too much fails alone
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in DEVICE_FATAL_MARKERS)


class LocalExecutor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, step: StepInput) -> StepOutput:
        try:
            return self.runner.execute(step)
        except Exception as exc:
            if is_device_fatal(exc):
                raise ExecutorDeadError(f"the device failed: {str(exc).splitlines()[0]}") from exc
            raise


def tokenizer_decode(checkpoint_dir: str | Path, tokenizer_file: str | Path | None = None):
    """mistral-common's detokenizer for a checkpoint (special tokens dropped)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from model.config import find_tokenizer_file

    path = find_tokenizer_file(checkpoint_dir, tokenizer_file)
    tokenizer = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer
    return tokenizer.decode, tokenizer.eos_id


def grammar_compiler(checkpoint_dir: str | Path, args: ModelArgs, tokenizer_file: str | Path | None = None):
    """Grammars (response_format) for this checkpoint's tokenizer; its vocabulary is built on first use."""
    from model.config import find_tokenizer_file
    from model.engine.guided import GrammarCompiler

    return GrammarCompiler(find_tokenizer_file(checkpoint_dir, tokenizer_file), args.vocab_size)


def engine_config_for(args: ModelArgs, num_blocks: int, eos_token_id: int, **overrides) -> EngineConfig:
    vision = args.vision_encoder
    image_ids = {}
    if vision is not None:
        image_ids = dict(image_token_id=vision.image_token_id, image_end_token_id=vision.image_end_token_id,
                         spatial_merge_size=vision.spatial_merge_size if vision.uses_patch_merger else 1)
    overrides.setdefault("max_model_len", args.max_position_embeddings)
    overrides.setdefault("vocab_size", args.vocab_size)
    return EngineConfig(num_blocks=num_blocks, eos_token_id=eos_token_id, **image_ids, **overrides)


def build_local_engine(checkpoint_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                       kv: KVBudget | None = None, block_size: int = 16, model: PixtralModel | None = None,
                       num_blocks: int | None = None, tokenizer: str | Path | None = None,
                       decode_batch_sizes: list[int] | None = None, **engine_overrides) -> LLMEngine:
    """An engine on one device; `num_blocks` fixes the KV cache size instead of the memory budget;
    `decode_batch_sizes` pads decode-only steps to those batch sizes, on static buffers (CUDA graphs
    on CUDA) with the FlexAttention backend (see ModelRunner)."""
    model = model or load_model(checkpoint_dir, device=device, dtype=dtype, tokenizer=tokenizer)
    num_blocks = num_blocks or (kv or KVBudget()).num_blocks(model, block_size)
    decode, eos = tokenizer_decode(checkpoint_dir, tokenizer)
    config = engine_config_for(model.args, num_blocks, eos, block_size=block_size, **engine_overrides)
    runner = ModelRunner(model, num_blocks, block_size, decode_batch_sizes,
                         max_pages=-(-config.max_model_len // block_size))
    return LLMEngine(LocalExecutor(runner), config, decode,
                     grammar_compiler(checkpoint_dir, model.args, tokenizer))
