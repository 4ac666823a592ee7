"""Fitting the app to the cluster it starts on, and failing fast where it cannot be placed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serving.config import AppConfig, model_configs
from serving.placement import PlacementError, check_placeable, decoder_cpus, fit_to_cluster
from tests.helpers import free_port

LAPTOP = [{"CPU": 2.0, "memory": 8e9}]


def _max_cpus(cfg: AppConfig) -> float:
    """CPUs asked for with every pool at its maximum replicas."""
    return (cfg.ingress.max_replicas * cfg.ingress.num_cpus + cfg.vision.max_replicas * cfg.vision.num_cpus
            + cfg.decoder.num_replicas * decoder_cpus(cfg))


def test_the_defaults_do_not_fit_a_laptop_until_fitted():
    cfg = AppConfig(model="/m")
    with pytest.raises(PlacementError, match=r"CPU 3 together.*node 0: CPU 2"):
        check_placeable([cfg], LAPTOP)  # ingress 1 + vision 1 + decoder 1
    notes = fit_to_cluster([cfg], LAPTOP)
    assert notes and _max_cpus(cfg) <= 2.0
    assert cfg.decoder.cpus_per_rank == 1.0  # the decoder keeps its whole CPU (one thread)
    check_placeable([cfg], LAPTOP)


def test_fitting_leaves_a_cluster_that_has_room_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    cfg = AppConfig(model="/m")
    assert fit_to_cluster([cfg], [{"CPU": 16.0}]) == ["decoder.cpu_threads -> 16 (16 cores for 1 decoder rank)"]
    assert (cfg.ingress.num_cpus, cfg.vision.num_cpus, cfg.decoder.cpus_per_rank) == (1.0, 1.0, 1.0)


def test_cpu_decoders_get_the_machines_cores_as_threads(monkeypatch):
    """The cores (those of the node, at most those this process may run on) shared by every
    decoder rank; set values, CUDA decoders and a share below the ask are left alone."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    single = AppConfig(model="/m")
    fit_to_cluster([single], LAPTOP)
    assert single.decoder.cpu_threads == 2
    tp2 = AppConfig.from_dict({"model": "/m", "decoder": {"tensor_parallel_size": 2}})
    fit_to_cluster([tp2], LAPTOP)
    assert tp2.decoder.cpu_threads is None  # one core each: what the ask gives already
    set_ = AppConfig.from_dict({"model": "/m", "decoder": {"cpu_threads": 1}})
    fit_to_cluster([set_], LAPTOP)
    assert set_.decoder.cpu_threads == 1
    cuda = AppConfig(model="/m", device="cuda")
    fit_to_cluster([cuda], [{"CPU": 2.0, "GPU": 1.0}])
    assert cuda.decoder.cpu_threads is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    a, b = model_configs({"models": [{"model": "/a", "served_model_name": "a"},
                                     {"model": "/b", "served_model_name": "b", "decoder": {"tensor_parallel_size": 2}}]})
    assert fit_to_cluster([a, b], [{"CPU": 16.0}]) == ["a: decoder.cpu_threads -> 2 (8 cores for 3 decoder ranks)",
                                                        "b: decoder.cpu_threads -> 2 (8 cores for 3 decoder ranks)"]
    with pytest.raises(ValueError, match="cpu_threads must be a positive integer"):
        AppConfig.from_dict({"model": "/m", "decoder": {"cpu_threads": 0}})


def test_a_decoder_bigger_than_the_cluster_is_shrunk_on_cpu():
    cfg = AppConfig.from_dict({"model": "/m", "decoder": {"tensor_parallel_size": 4, "cpus_per_rank": 2.0}})
    fit_to_cluster([cfg], LAPTOP)
    assert _max_cpus(cfg) <= 2.0
    check_placeable([cfg], LAPTOP)


def test_gpus_are_never_shrunk_and_the_error_names_both_sides():
    cfg = AppConfig.from_dict({"model": "/m", "device": "cuda", "decoder": {"tensor_parallel_size": 8}})
    nodes = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]
    fit_to_cluster([cfg], nodes)
    with pytest.raises(PlacementError) as err:
        check_placeable([cfg], nodes)
    message = str(err.value)
    assert "tensor parallel 8" in message and "GPU 7.2" in message and "node 1: CPU 32, GPU 4" in message
    assert "gpus_per_rank" in message  # the knob to turn


def test_a_missing_accelerator_is_named():
    cfg = AppConfig.from_dict({"model": "/m", "device": "cuda", "vision": {"accelerator_type": "L4"}})
    with pytest.raises(PlacementError, match="vision pool replica asks for .*accelerator_type:L4"):
        check_placeable([cfg], [{"CPU": 8.0, "GPU": 1.0, "accelerator_type:H100": 1.0}])


def test_several_models_share_the_cluster_and_errors_name_the_model():
    cfg_12b, cfg_large = model_configs({"model": "/m", "models": [
        {"served_model_name": "small"},
        {"served_model_name": "big", "decoder": {"tensor_parallel_size": 2}}]})
    configs = [cfg_12b, cfg_large]
    with pytest.raises(PlacementError, match="decoder replica of big asks for CPU 2.1"):
        check_placeable(configs, LAPTOP)
    notes = fit_to_cluster(configs, LAPTOP)
    assert any(n.startswith("big: decoder.cpus_per_rank") for n in notes)
    total = configs[0].ingress.max_replicas * configs[0].ingress.num_cpus + sum(
        c.vision.max_replicas * c.vision.num_cpus + c.decoder.num_replicas * decoder_cpus(c) for c in configs)
    assert total <= 2.0
    assert cfg_12b.ingress.num_cpus == cfg_large.ingress.num_cpus  # one ingress for the app
    check_placeable(configs, LAPTOP)
    gpu = model_configs({"device": "cuda", "models": [
        {"model": "/a", "served_model_name": "a"},
        {"model": "/b", "served_model_name": "b", "decoder": {"tensor_parallel_size": 8}}]})
    with pytest.raises(PlacementError, match=r"decoder replica of b \(tensor parallel 8\)"):
        check_placeable(gpu, [{"CPU": 32.0, "GPU": 4.0}])


def test_plain_command_becomes_healthy_on_a_two_cpu_cluster(mistral_12b, tmp_path):
    """`pixtral-serve --model DIR`, nothing else, on a Ray cluster of 2 CPUs: it fits itself and
    answers. (Its own local cluster, the way a new user starts it.)"""
    port = free_port()
    cli = os.path.join(os.path.dirname(sys.executable), "pixtral-serve")
    # a fresh cluster of its own even where the test session runs one, as on a new machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    proc = subprocess.Popen([cli, "--model", str(mistral_12b), "--num-cpus", "2", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        deadline = time.time() + 300
        for line in proc.stdout:
            lines.append(line)
            if "pixtral-serve is up" in line or time.time() > deadline:
                break
        assert any("pixtral-serve is up" in line for line in lines), "".join(lines[-30:])
        assert any("fitted to this cluster" in line for line in lines)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        r = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "pixtral", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)  # the command shuts Serve and its Ray cluster down itself
        try:
            proc.wait(timeout=90)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of its cluster is left
            except ProcessLookupError:
                pass
