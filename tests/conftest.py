"""Test-wide settings."""

import pytest
import torch

# The suite's models are tiny: one intra-op thread is faster than several on a shared
# 2-core machine, and makes CPU results independent of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, no dashboard) for every Ray test: starting one costs ~10 s."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'bitwidth[ray]')")
    from bitwidth.executors import start_local_ray

    ray = start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()
