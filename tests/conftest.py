"""Shared fixtures. Tests run on CPU with 8 fake devices (sharding tests use them; the others use one).

`-m accelerator` selects the compiled kernel tests: then JAX keeps the host's own accelerator instead of the CPU.
transformers/torch are test-only references.
"""

import os
import sys


def _marker_expression(argv: list[str]) -> str:
    """pytest's -m expression on the command line ("" if none), read before JAX starts."""
    for i, a in enumerate(argv):
        if a == "-m":
            return argv[i + 1] if i + 1 < len(argv) else ""
        if a.startswith("-m"):
            return a[2:].lstrip("=")
    return ""


_expr = _marker_expression(sys.argv[1:])
if "accelerator" not in _expr or "not accelerator" in _expr:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

if os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture
def one_device_mesh():
    from phi_jax.sharding import make_mesh

    return make_mesh(devices=jax.devices()[:1])
