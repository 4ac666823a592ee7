"""The pixtral-serve command line turns flags into the application config."""

from __future__ import annotations

import pytest

from serving.cli import config_from_args, parse_args


def test_flags_override_config(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXTRAL_SERVE_CACHE", str(tmp_path / "cache"))
    cfg = config_from_args(parse_args([
        "--model", "/models/x", "--tensor-parallel-size", "8", "--device", "cuda", "--dtype", "bfloat16",
        "--vision-replicas", "auto", "--vision-max-replicas", "6", "--max-model-len", "32768",
        "--max-images", "4", "--api-key", "k1", "--api-key", "k2", "--served-model-name", "pixtral-large-2411",
        "--model-alias", "pixtral-large-latest", "--stream-interval-ms", "0", "--no-direct-streams"]))
    assert cfg.model == "/models/x" and cfg.decoder.tensor_parallel_size == 8
    assert (cfg.device, cfg.dtype, cfg.max_model_len) == ("cuda", "bfloat16", 32768)
    assert cfg.vision.num_replicas == "auto" and cfg.vision.max_replicas == 6
    assert cfg.images.max_images == 4 and cfg.api_keys == ["k1", "k2"]
    assert cfg.model_names == ["pixtral-large-2411", "pixtral-large-latest"]
    assert cfg.decoder.stream_interval_ms == 0 and cfg.decoder.direct_streams is False


def test_no_model_means_the_cached_tiny_demo(tmp_path, monkeypatch):
    monkeypatch.setenv("PIXTRAL_SERVE_CACHE", str(tmp_path))
    monkeypatch.delenv("PIXTRAL_SERVE_API_KEYS", raising=False)
    cfg = config_from_args(parse_args([]))
    assert cfg.model == str(tmp_path / "tiny-12b") and (tmp_path / "tiny-12b" / "params.json").exists()
    assert "pixtral-12b-2409" in cfg.model_names and cfg.api_keys == []


def test_cuda_defaults_to_bf16_and_accounts_for_every_gpu():
    from serving.app import decoder_bundles, decoder_options, vision_options
    from serving.config import DECODER_GPU_SHARE, VISION_GPU_SHARE

    cfg = config_from_args(parse_args(["--model", "/models/x", "--device", "cuda", "--tensor-parallel-size", "2",
                                       "--tokenizer", "/models/tekken.json"]))
    assert cfg.dtype == "bfloat16" and cfg.tokenizer == "/models/tekken.json"
    assert vision_options(cfg)["ray_actor_options"]["num_gpus"] == VISION_GPU_SHARE == 0.1
    # the ranks' bundles hold the GPUs; a vision replica still fits beside each rank
    assert [b.get("GPU", 0) for b in decoder_bundles(cfg)] == [0, DECODER_GPU_SHARE, DECODER_GPU_SHARE]
    assert DECODER_GPU_SHARE + VISION_GPU_SHARE == 1.0
    single = config_from_args(parse_args(["--model", "/models/x", "--device", "cuda"]))
    assert decoder_options(single)["ray_actor_options"]["num_gpus"] == DECODER_GPU_SHARE
    explicit = config_from_args(parse_args(["--model", "/models/x", "--device", "cuda", "--dtype", "float16",
                                            "--vision-gpus", "0.5"]))
    assert explicit.dtype == "float16" and vision_options(explicit)["ray_actor_options"]["num_gpus"] == 0.5
    # CUDA graphs for decode at 1, 2, 4, 8, then every 16 up to max_num_seqs (64); none on CPU
    assert single.decoder.cuda_graph_batch_sizes == [1, 2, 4, 8, 16, 32, 48, 64]
    cpu = config_from_args(parse_args(["--model", "/models/x"]))
    assert cpu.dtype == "float32" and vision_options(cpu)["ray_actor_options"]["num_gpus"] == 0
    assert cpu.decoder.cuda_graph_batch_sizes == []
    assert [b.get("GPU", 0) for b in decoder_bundles(cpu)] == [0]


def test_stream_interval_is_checked():
    from serving.config import AppConfig

    assert AppConfig.from_dict({"model": "/m"}).decoder.stream_interval_ms == 50
    for bad in (-1, 5000, "fast"):
        with pytest.raises(ValueError, match="stream_interval_ms must be between 0 and 1000"):
            AppConfig.from_dict({"model": "/m", "decoder": {"stream_interval_ms": bad}})
    assert AppConfig.from_dict({"model": "/m"}).decoder.direct_streams is True
    with pytest.raises(ValueError, match="direct_streams must be true or false"):
        AppConfig.from_dict({"model": "/m", "decoder": {"direct_streams": "no"}})
    assert AppConfig.from_dict({"model": "/m"}).decoder.step_timeout_s == 300
    with pytest.raises(ValueError, match="step_timeout_s must be a positive number of seconds"):
        AppConfig.from_dict({"model": "/m", "decoder": {"step_timeout_s": 0}})


def test_gpu_shares_are_checked():
    """A tensor-parallel rank needs a GPU to itself: two ranks of 0.5 could be packed onto one GPU,
    which NCCL refuses. The memory fraction is a fraction."""
    from serving.config import DECODER_GPU_SHARE, AppConfig

    def config(**decoder):
        return AppConfig.from_dict({"model": "/m", "device": "cuda", "decoder": decoder})

    assert config(tensor_parallel_size=8).decoder.gpus_per_rank == DECODER_GPU_SHARE
    assert config(gpus_per_rank=0.5).decoder.gpus_per_rank == 0.5  # one rank may share its GPU
    with pytest.raises(ValueError, match="gpus_per_rank must be over 0.5 with tensor_parallel_size > 1"):
        config(tensor_parallel_size=2, gpus_per_rank=0.5)
    for bad in (0, 90, "most"):
        with pytest.raises(ValueError, match="gpu_memory_utilization is a fraction"):
            config(gpu_memory_utilization=bad)
