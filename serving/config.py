"""One configuration per served model, from Serve config `args` or the CLI.

A plain dataclass (validated once); the deployments read their own slices of it.

One application serves one model, or several listed under `models:` (see `model_configs`). Each
model has its own vision pool and decoder; one ingress routes by the request's `model` field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

# On CUDA, the share of one GPU that a vision replica and a decoder rank ask Ray for by default.
# Together they make one GPU, so a vision replica fits beside each decoder rank (whose KV cache
# leaves 1 - gpu_memory_utilization of the memory free) as well as on GPUs of its own; Ray then
# accounts for every GPU the app uses.
VISION_GPU_SHARE = 0.1
DECODER_GPU_SHARE = 1.0 - VISION_GPU_SHARE


@dataclass
class ImageLimits:
    max_images: int = 12  # per request; one more is a 413 (as Mistral's API does)
    max_image_bytes: int = 20 << 20  # encoded bytes per image
    # decoded width*height, checked before decoding: a 24-MP phone photo fits; the model sees at
    # most 1024x1024, so more pixels only cost decode time and memory
    max_image_pixels: int = 25_000_000
    fetch_timeout_s: float = 10.0  # one http(s) image, all of it: DNS, redirects, body
    request_images_timeout_s: float = 30.0  # all of a request's images, fetched and decoded
    max_redirects: int = 3
    allow_private_urls: list[str] = field(default_factory=list)  # hostnames/CIDRs allowed despite the guard
    file_root: str | None = None  # file:// URLs allowed only under this directory


@dataclass
class VisionPoolConfig:
    num_replicas: int | str = "auto"  # "auto" = autoscaled between min and max
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 2.0  # sustained load this long adds replicas
    downscale_delay_s: float = 60.0  # sustained idleness this long removes them
    max_batch_size: int = 16
    # one encoder forward takes at most this many patches (8 images of 1024x1024 at patch 16); a
    # larger batch is encoded in several forwards, so activation memory is bounded by patches, not
    # by image count. An image larger than the cap is encoded alone.
    max_batch_patches: int = 32768
    batch_wait_timeout_s: float = 0.005
    num_cpus: float = 1.0
    num_gpus: float | None = None  # default: VISION_GPU_SHARE on CUDA, 0 on CPU (the encoder is small)
    cache_bytes: int = 256 << 20  # encoder-output cache, keyed by image content hash
    # route an image to the replica whose cache likely holds it (serving/routing.py); a replica
    # takes its keys only while under affinity_load_factor x the mean load
    affinity_routing: bool = True
    affinity_load_factor: float = 1.25
    accelerator_type: str | None = None  # e.g. "L4": land on the nodes that name it
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources to require


@dataclass
class DecoderConfig:
    # "auto": autoscaled between min and max replicas on the engines' running and waiting
    # sequences and KV usage (serving/autoscaling.py); each replica is a whole placement group
    num_replicas: int | str = 1
    min_replicas: int = 1
    max_replicas: int = 4
    target_sequences: float | None = None  # running + waiting per replica; default 3/4 of max_num_seqs
    kv_high: float = 0.9  # a replica above this KV usage with sequences waiting asks for one more
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0  # a decoder takes minutes to load: keep it through short lulls
    look_back_period_s: float = 30.0  # the window the policy averages the engines' reports over
    metrics_interval_s: float = 10.0  # how often replicas send them (Serve's default)
    tensor_parallel_size: int = 1
    cpus_per_rank: float = 1.0
    # torch threads of each CPU rank; default: the whole CPUs it asks for (Ray's rule), at least 1.
    # A local `pixtral-serve` run gives the decoder ranks the machine's cores (serving/placement.py)
    cpu_threads: int | None = None
    gpus_per_rank: float | None = None  # default: DECODER_GPU_SHARE on CUDA
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # decode-only steps of up to these many sequences replay CUDA graphs; default on CUDA: powers
    # of two to 16, then steps of 16, up to max_num_seqs; none on CPU ([] turns them off)
    cuda_graph_batch_sizes: list[int] | None = None
    kv_cache_bytes: int = 1 << 30  # CPU budget
    gpu_memory_utilization: float = 0.9
    # a replica whose engine has spent longer than this in one step fails its health check, and
    # Serve replaces it (a hung GPU otherwise looks healthy); a tensor-parallel step that takes
    # longer stops the engine
    step_timeout_s: float = 300.0
    enable_prefix_caching: bool = True
    affinity_routing: bool = True  # route a prompt to the replica whose prefix cache likely holds it
    affinity_load_factor: float = 1.25
    max_queued_requests: int = 256
    # a streamed request's outputs between its first and its last go to the ingress at most once
    # per this many ms, each with every token made meanwhile (0: one message per step); see
    # model/engine/async_engine.py
    stream_interval_ms: float = 50.0
    # outputs between a request's first and last go to its ingress replica in one frame per step
    # (and per interval) over TCP, not one Serve message each; see serving/direct_streams.py
    direct_streams: bool = True
    accelerator_type: str | None = None  # e.g. "H100"
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class IngressConfig:
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 32.0
    max_ongoing_requests: int = 256  # per ingress replica
    max_queued_requests: int = 1024  # past this the proxy answers 503 at once
    num_cpus: float = 1.0


@dataclass
class AppConfig:
    model: str  # checkpoint directory (either format)
    tokenizer: str | None = None  # mistral-common tokenizer file, for checkpoints that ship none
    served_model_name: str = "pixtral"
    model_aliases: list[str] = field(default_factory=list)
    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str | None = None  # "float32" | "bfloat16" | "float16"; default: bfloat16 on CUDA, float32 on CPU
    max_model_len: int | None = None  # default: the checkpoint's context, capped by the KV cache
    default_max_tokens: int = 1024
    # per request, over its n choices: generated tokens, and logprob entries to build (each
    # generated token with logprobs is 1 + top_logprobs entries)
    max_request_output_tokens: int = 65536
    max_request_logprob_entries: int = 65536
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 64 << 20
    images: ImageLimits = field(default_factory=ImageLimits)
    vision: VisionPoolConfig = field(default_factory=VisionPoolConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)

    def __post_init__(self) -> None:
        """Check the values, and fill the defaults that depend on the device."""
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        cuda = self.device == "cuda"
        if self.dtype is None:
            self.dtype = "bfloat16" if cuda else "float32"
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}: float32, bfloat16 or float16")
        if self.decoder.tensor_parallel_size < 1:
            raise ValueError(f"decoder.tensor_parallel_size must be at least 1, got {self.decoder.tensor_parallel_size}")
        d = self.decoder
        if d.num_replicas != "auto" and not (isinstance(d.num_replicas, int) and d.num_replicas >= 1):
            raise ValueError(f"decoder.num_replicas must be a positive integer or 'auto', got {d.num_replicas!r}")
        if not 1 <= d.min_replicas <= d.max_replicas:
            raise ValueError(f"decoder replicas need 1 <= min_replicas <= max_replicas, got {d.min_replicas}, "
                             f"{d.max_replicas}")
        if d.target_sequences is None:
            d.target_sequences = max(0.75 * d.max_num_seqs, 1.0)
        if d.cpu_threads is not None and not (isinstance(d.cpu_threads, int) and d.cpu_threads >= 1):
            raise ValueError(f"decoder.cpu_threads must be a positive integer, got {d.cpu_threads!r}")
        if not (isinstance(d.stream_interval_ms, (int, float)) and 0 <= d.stream_interval_ms <= 1000):
            raise ValueError(f"decoder.stream_interval_ms must be between 0 and 1000, got {d.stream_interval_ms!r}")
        if not isinstance(d.direct_streams, bool):
            raise ValueError(f"decoder.direct_streams must be true or false, got {d.direct_streams!r}")
        if d.cuda_graph_batch_sizes is None:
            d.cuda_graph_batch_sizes = default_graph_batch_sizes(d.max_num_seqs) if cuda else []
        if not all(isinstance(b, int) and b >= 1 for b in d.cuda_graph_batch_sizes):
            raise ValueError(f"decoder.cuda_graph_batch_sizes must be positive integers, got {d.cuda_graph_batch_sizes}")
        if self.vision.num_gpus is None:
            self.vision.num_gpus = VISION_GPU_SHARE if cuda else 0.0
        if self.decoder.gpus_per_rank is None:
            self.decoder.gpus_per_rank = DECODER_GPU_SHARE if cuda else 0.0
        if cuda and not 0 < self.decoder.gpus_per_rank <= 1:
            raise ValueError(f"decoder.gpus_per_rank must be in (0, 1] on CUDA, got {self.decoder.gpus_per_rank}")
        if cuda and d.tensor_parallel_size > 1 and d.gpus_per_rank <= 0.5:
            # Ray could pack two ranks of the group onto one GPU, and give both its id: NCCL refuses
            # a communicator with a GPU twice ("Duplicate GPU detected")
            raise ValueError(f"decoder.gpus_per_rank must be over 0.5 with tensor_parallel_size > 1, "
                             f"so that no two ranks share a GPU; got {self.decoder.gpus_per_rank}")
        if not (isinstance(d.step_timeout_s, (int, float)) and d.step_timeout_s > 0):
            raise ValueError(f"decoder.step_timeout_s must be a positive number of seconds, got {d.step_timeout_s!r}")
        if not (isinstance(d.gpu_memory_utilization, (int, float)) and 0 < d.gpu_memory_utilization <= 1):
            raise ValueError(f"decoder.gpu_memory_utilization is a fraction of the GPU's memory, in (0, 1]; "
                             f"got {d.gpu_memory_utilization!r}")

    @property
    def model_names(self) -> list[str]:
        return [self.served_model_name, *self.model_aliases]

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "AppConfig":
        """Nested dicts (Serve config `args`, YAML) -> AppConfig; unknown keys are an error."""
        data = dict(data)
        nested = {"images": ImageLimits, "vision": VisionPoolConfig, "decoder": DecoderConfig, "ingress": IngressConfig}
        for key, cls in nested.items():
            if isinstance(data.get(key), dict):
                data[key] = _build(cls, data[key], key)
        return _build(AppConfig, data, "app")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then every 16 up to max_num_seqs (which is always one of them)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


def _build(cls: type, values: dict[str, Any], where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} config keys: {unknown}; known: {sorted(known)}")
    return cls(**values)


# keys that belong to the application, not to one model: set beside `models:`, never in an entry
APP_WIDE_KEYS = ("ingress", "api_keys", "max_body_bytes")
# sections an entry of `models:` merges key by key into the shared ones beside it
NESTED_SECTIONS = ("images", "vision", "decoder")


def model_configs(args: dict[str, Any]) -> list[AppConfig]:
    """Serve config `args` -> one AppConfig per served model.

    Without `models:` the args are one model's config. With it, every entry is one model, and the
    keys beside `models:` are shared: the app-wide ones (ingress, api_keys, max_body_bytes), and
    defaults each entry may override (device, dtype, images, vision, decoder... section by key).
    Served names and aliases must be unique across the models: they are what requests route by.
    """
    if "models" not in args:
        return [AppConfig.from_dict(args)]
    entries = args["models"]
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError("models must be a non-empty list of model configs")
    shared = {k: v for k, v in args.items() if k != "models"}
    configs = []
    for index, entry in enumerate(entries):
        misplaced = sorted(set(entry) & set(APP_WIDE_KEYS))
        if misplaced:
            raise ValueError(f"models[{index}] sets {misplaced}, which are app-wide: set them beside models")
        merged = {**shared, **entry}
        for section in NESTED_SECTIONS:
            if isinstance(shared.get(section), dict) and isinstance(entry.get(section), dict):
                merged[section] = {**shared[section], **entry[section]}
        configs.append(AppConfig.from_dict(merged))
    seen: dict[str, str] = {}
    for cfg in configs:
        for name in cfg.model_names:
            if name in seen:
                raise ValueError(f"model name {name!r} is used by both {seen[name]!r} and {cfg.served_model_name!r}; "
                                 "served names and aliases must be unique")
            seen[name] = cfg.served_model_name
    slugs = [deployment_names(cfg, several=True)[1] for cfg in configs]
    if len(set(slugs)) < len(slugs):
        raise ValueError(f"served model names must differ in more than punctuation: deployments {slugs}")
    return configs


def app_args(configs: list[AppConfig]) -> dict[str, Any]:
    """The inverse of `model_configs`: args for `build_app` (after the CLI fitted the configs)."""
    if len(configs) == 1:
        return configs[0].to_dict()
    shared = {k: v for k, v in configs[0].to_dict().items() if k in APP_WIDE_KEYS}
    entries = [{k: v for k, v in cfg.to_dict().items() if k not in APP_WIDE_KEYS} for cfg in configs]
    return {**shared, "models": entries}


def deployment_names(cfg: AppConfig, several: bool) -> tuple[str, str]:
    """(vision pool, decoder) deployment names: plain for one model, suffixed by its name for several."""
    if not several:
        return "VisionEncoder", "Decoder"
    slug = re.sub(r"[^A-Za-z0-9_.-]", "-", cfg.served_model_name)
    return f"VisionEncoder-{slug}", f"Decoder-{slug}"
