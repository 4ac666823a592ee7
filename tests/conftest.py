from __future__ import annotations

from pathlib import Path

import pytest

from model.convert import convert
from model.tiny import make_tiny_checkpoint


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
    resources say (vision pool on `vision_node`, decoder on `decoder_node`). Logical CPUs exceed
    the 2 real cores; actors take fractions of them.
    """
    import ray
    from ray.cluster_utils import Cluster

    env = {"OMP_NUM_THREADS": "1", "RAY_SERVE_LOG_TO_STDERR": "0"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"vision_node": 8})
    cluster.add_node(num_cpus=2, resources={"decoder_node": 8})
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()
    cluster.shutdown()
