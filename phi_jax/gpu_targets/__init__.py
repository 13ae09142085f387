"""NVIDIA GPUs described for XLA:GPU, so a host without a GPU can compile for them (memory plans, HLO checks).

    os.environ.update(DEVICELESS_GPU_ENV)              # before JAX's backends start (JAX_PLATFORMS=cpu)
    devices = gpu_devices("h100:8")                     # 8 "NVIDIA H100 80GB HBM3" devices, compile-only
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 8, 1), ("data", "fsdp", "tensor"))

Each target is a GpuTargetConfig text proto beside this file, written from the GPU's spec sheets (the comments in
each file name the source of every figure). `jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=TEXT, topology=...)` turns it into devices that `jax.jit(...).lower(...).compile()` accepts, through
JAX's CUDA plugin: it needs `pip install ".[cuda12]"` (jax-cuda12-plugin with its CUDA wheels, ~5.5 GB), no GPU
and no driver. Those wheels belong in their own virtual environment on a CPU host (docs/PERFORMANCE.md, "GPU memory
plans"): with them installed JAX probes for a GPU at start-up.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HERE = Path(__file__).resolve().parent
# name -> text proto file; the names are what "NAME:COUNT" specs take.
TARGETS = {"h100": "h100_sxm_80gb.txtpb", "a100": "a100_sxm_80gb.txtpb"}
# Set before JAX's backends start (the first computation or jax.devices()), with JAX_PLATFORMS=cpu set before JAX
# is imported. The CUDA plugin's start-up check calls cuInit, which fails without a driver (CUDA error 303) and
# leaves the plugin unable to describe a topology ("topology not implemented for cuda"); CUDA_VISIBLE_DEVICES=-1
# hides any real GPU, so the devices are the described ones only.
DEVICELESS_GPU_ENV = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "CUDA_VISIBLE_DEVICES": "-1"}
GPUS_PER_HOST = 8


def target_config(name: str) -> str:
    """The GpuTargetConfig text proto of GPU `name` (a key of TARGETS)."""
    if name not in TARGETS:
        raise ValueError(f"GPU {name!r} has no target config; choose one of {sorted(TARGETS)}.")
    return (_HERE / TARGETS[name]).read_text()


def device_memory_bytes(name: str) -> int:
    """The device memory the target config declares (what the CUDA driver reports for that GPU)."""
    return int(re.search(r"device_memory_size:\s*(\d+)", target_config(name))[1])


def parse_spec(spec: str) -> tuple[str, int]:
    """"h100:8" -> ("h100", 8): a TARGETS name and a GPU count (up to 8, or a multiple of 8: 8 per host)."""
    name, _, count = spec.partition(":")
    if name not in TARGETS or not count.isdigit() or int(count) < 1 or (
            int(count) > GPUS_PER_HOST and int(count) % GPUS_PER_HOST):
        raise ValueError(f"GPU spec {spec!r} must be NAME:COUNT with NAME one of {sorted(TARGETS)} and COUNT 1..8 or "
                         f"a multiple of 8 (8 GPUs per host), e.g. 'h100:8'.")
    return name, int(count)


def topology(count: int) -> str:
    """The CUDA plugin's topology string, slices x hosts x GPUs per host: 8 GPUs per host, one slice."""
    hosts = max(1, count // GPUS_PER_HOST)
    return f"1x{hosts}x{count // hosts}"


def gpu_devices(spec: str) -> list:
    """The devices of `spec` ("h100:8"), for ahead-of-time compilation only; DEVICELESS_GPU_ENV must be set before
    JAX's backends start (checked here)."""
    name, count = parse_spec(spec)
    missing = {k: v for k, v in DEVICELESS_GPU_ENV.items() if os.environ.get(k) != v}
    if missing:
        raise RuntimeError(f"compiling for {spec!r} without a GPU needs {missing} in the environment before JAX "
                           "starts (phi_jax.gpu_targets.DEVICELESS_GPU_ENV).")
    try:
        import jax_cuda12_plugin  # noqa: F401  (the plugin that describes and compiles for CUDA devices)
    except ImportError as e:
        raise RuntimeError(f"compiling for {spec!r} needs JAX's CUDA plugin: pip install -e '.[cuda12]' (about 5.5 GB; "
                           "in a virtual environment of its own on a CPU host).") from e
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="cuda", target_config=target_config(name), topology=topology(count))
    return list(desc.devices)
