"""Shared fixtures. Tests run on CPU with 8 fake devices (sharding tests use them; the others use one).

transformers/torch are test-only references.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def one_device_mesh():
    from phi_jax.sharding import make_mesh

    return make_mesh(devices=jax.devices()[:1])
