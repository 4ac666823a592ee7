from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from model.convert import convert
from model.tiny import make_tiny_checkpoint
from tests.helpers import deploy_test_app, free_port, wait_healthy


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run on a GPU machine (see the README); here they are reported as skipped."""
    import torch

    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def hf_12b(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf_12b"), fmt="hf", shape="12b", seed=1)


@pytest.fixture(scope="session")
def hf_large(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf_large"), fmt="hf", shape="large", seed=2)


@pytest.fixture(scope="session")
def mistral_12b(hf_12b, tmp_path_factory) -> Path:
    """The same weights as hf_12b, converted to the Mistral format."""
    return convert(hf_12b, tmp_path_factory.mktemp("mistral_12b"))


@pytest.fixture(scope="session")
def mistral_large(hf_large, tmp_path_factory) -> Path:
    return convert(hf_large, tmp_path_factory.mktemp("mistral_large"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole test session: a head and two worker nodes on this machine.

    The nodes carry custom resources so tests can check that deployments land where their
    resources say (vision pool on `vision_node`, decoder on `decoder_node`), and each exports
    metrics on its own port, as the nodes of a KubeRay cluster do. Logical CPUs exceed the 2 real
    cores; actors take fractions of them.
    """
    import ray
    from ray.cluster_utils import Cluster

    env = {"OMP_NUM_THREADS": "1"}
    ports = [free_port() for _ in range(3)]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "metrics_export_port": ports[0],
        "_system_config": {"metrics_report_interval_ms": 1000}})
    cluster.add_node(num_cpus=2, resources={"vision_node": 8}, metrics_export_port=ports[1])
    cluster.add_node(num_cpus=2, resources={"decoder_node": 8}, metrics_export_port=ports[2])
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    yield SimpleNamespace(ray=ray, cluster=cluster, metrics_ports=ports)
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def served(ray_cluster, mistral_12b):
    """The whole application on the session cluster; yields its base URL."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy_test_app(mistral_12b)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base
    serve.shutdown()
