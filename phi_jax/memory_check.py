"""Will the run fit in memory? Checked twice before any parameter is allocated, so that a run too big for its
devices (or, on CPU, for the host: phi-1.5's fp32 state alone is 17 GB) stops with the figures instead of being
killed by the OOM killer or thrashing the host:

1. the train state's bytes plus one gradient (jax.eval_shape: no compilation, no allocation), a lower bound;
2. the compiled train step's own figures (`compiled.memory_analysis()`: arguments + outputs - donated + temporaries).

The budget is the device's memory limit on GPU/TPU, and the host's available memory (MemAvailable) on CPU, where
every local device shares it. PHI_JAX_AVAILABLE_MEMORY (bytes, or with a K/M/G suffix) replaces the measured
figure: to keep headroom on a shared host, or to test the check.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger("phi_jax")

AVAILABLE_ENV = "PHI_JAX_AVAILABLE_MEMORY"
GiB = 1024**3
KNOBS = ("lower --config.micro_batch_per_device, set --config.remat=full (or save_dots), spread the state over "
         "more devices (--config.sharding=fsdp, a larger mesh), or choose a smaller --config.model")


class InsufficientMemoryError(ValueError):
    pass


def _parse_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}.get(text[-1:], 1)
    return int(float(text.rstrip("KMGT")) * scale)


def host_available_bytes(meminfo: str = "/proc/meminfo") -> int:
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{meminfo} has no MemAvailable line")


def budget() -> tuple[int, bool, str]:
    """(bytes, shared_by_local_devices, where the figure comes from)."""
    device = jax.local_devices()[0]
    shared = device.platform == "cpu"
    if value := os.environ.get(AVAILABLE_ENV):
        return _parse_bytes(value), shared, f"${AVAILABLE_ENV}"
    if shared:
        return host_available_bytes(), True, "the host's available memory (MemAvailable)"
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return 0, False, ""
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), False, f"{device.device_kind}'s free memory"


def _per_device_bytes(tree) -> int:
    """The largest per-device share of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def _check(need_per_device: int, what: str, *, knobs: str = KNOBS) -> None:
    available, shared, source = budget()
    if not source:
        log.info("memory check skipped: this device reports no memory limit")
        return
    devices = jax.local_device_count() if shared else 1
    need = need_per_device * devices
    where = f"{devices} local devices together" if devices > 1 else "per device"
    log.info("memory check: %s needs %.2f GiB (%s); %s allows %.2f GiB", what, need / GiB, where, source,
             available / GiB)
    if need > available:
        raise InsufficientMemoryError(
            f"The run does not fit: {what} needs {need / GiB:.2f} GiB ({where}) but {source} is "
            f"{available / GiB:.2f} GiB. Nothing was allocated. To fit: {knobs}.")


def check_state_fits(abstract_state, abstract_params) -> None:
    """Before compiling or allocating: the state (parameters, optimizer moments) plus one gradient."""
    need = _per_device_bytes(abstract_state) + _per_device_bytes(abstract_params)
    _check(need, "the train state plus its gradients (a lower bound)",
           knobs=KNOBS.replace("lower --config.micro_batch_per_device, set --config.remat=full (or save_dots), ", ""))


def check_compiled_fits(compiled) -> None:
    """Before allocating: the compiled step's arguments, outputs (less the donated state) and temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        log.warning("memory check skipped: the compiled step reports no memory analysis on this backend")
        return
    need = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    _check(need, f"the compiled train step ({m.temp_size_in_bytes / GiB:.2f} GiB of it temporaries)")
