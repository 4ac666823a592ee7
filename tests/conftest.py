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
    """One local Ray cluster for the whole test session (2 cores: actors take fractional CPUs)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
