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
import math
import os
import re
import time
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


# ------------------------------------------------------------------- planning: compiling for a TPU slice from here
# What libtpu needs to compile for a TPU topology on a host without one (set before JAX's backends start).
# ALLOW_MULTIPLE_LIBTPU_LOAD: without it, a second process that loads libtpu (a test beside a memory plan) fails on
# libtpu's lockfile.
DEVICELESS_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                      "TPU_ACCELERATOR_TYPE": "v5litepod-4", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# HBM per chip that the TPU compiler reports as available in its out-of-memory messages (libtpu 0.0.42), GiB.
AVAILABLE_HBM_GIB = {"TPU v5 lite": 15.75, "TPU v6 lite": 31.25, "TPU v5": 95.74}


def _small_slice_bounds(topology: str) -> dict:
    """A slice smaller than one host's default 2x2x1 chips ("v5e:1x1": one chip) is described as a host of its own
    size (libtpu refuses it otherwise: "not divisible by ... chips_per_host_bounds")."""
    try:
        dims = [int(d) for d in topology.split(":")[1].split("x")]
    except (IndexError, ValueError):
        return {}  # libtpu names what is wrong with it
    if math.prod(dims) >= 4:
        return {}
    return {"chips_per_host_bounds": tuple(dims + [1] * (3 - len(dims)))}


def tpu_devices(topology: str) -> list:
    """The devices of a TPU slice ("v5e:2x4", ...), for ahead-of-time compilation (DEVICELESS_TPU_ENV must be set
    before JAX's backends start on a host without a TPU)."""
    from jax.experimental import topologies

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                               **_small_slice_bounds(topology)).devices
        # v4 and v5p run one device per chip (megacore) but describe both cores; JAX meshes take the first.
        return [d for d in devices if getattr(d, "core_on_chip", 0) == 0]
    except Exception as e:
        raise ValueError(f"libtpu cannot describe topology {topology!r}: {str(e).splitlines()[0]} (names look like "
                         "v4:2x2x1, v5e:2x4, v5e:4x4, v5p:2x2x1, v6e:2x4).") from e


def compile_report(trainer, micro_batch: int, accum: int = 1, seq_len: int = 2048,
                   available_gib: float | None = None) -> dict:
    """Compiles `trainer`'s train step (phi_jax.trainer) for `micro_batch` sequences per device; returns its
    per-device memory in GiB, or the compiler's out-of-memory message. Nothing is allocated.

    `fits` is the compiler's verdict and, when `available_gib` is given, also that its memory analysis (arguments
    + temporaries) stays within it: near the limit the TPU compiler accepts programs whose own memory analysis
    exceeds the HBM it reports as available, and the stricter reading is the safe one until a TPU settles it."""
    rows = micro_batch * trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    start = time.perf_counter()
    try:
        compiled = trainer.train_step.lower(trainer.abstract_state,
                                            trainer.abstract_batch(accum, rows, seq_len)).compile()
    except Exception as e:  # the compiler's verdict; anything but running out of memory is a real error
        if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
            raise
        return {"fits": False, "compiler_accepted": False, "compile_sec": round(time.perf_counter() - start, 1),
                "compiler_message": _oom_lines(str(e))}
    mem = compiled.memory_analysis()
    # Which Pallas kernels the program runs (their named scopes survive into the compiled HLO's metadata).
    kernels = sorted(set(re.findall(r'op_name="[^"]*?(\w*splash\w*|flash_attention_\w+|fused_dense_\w+)',
                                    compiled.as_text())))
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    need = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / GiB
    return {"fits": available_gib is None or need <= available_gib, "compiler_accepted": True,
            "arguments_plus_temporaries_gib": need, "available_gib": available_gib,
            "compile_sec": round(time.perf_counter() - start, 1), "pallas_kernels": kernels, "per_device_gib": {
        "train_state (params + optimizer)": _per_device_bytes(trainer.abstract_state) / GiB,
        "arguments": mem.argument_size_in_bytes / GiB, "outputs": mem.output_size_in_bytes / GiB,
        "aliased (donated)": mem.alias_size_in_bytes / GiB, "temporaries": mem.temp_size_in_bytes / GiB,
        "peak estimate": peak / GiB}}


def _oom_lines(message: str) -> str:
    """The compiler's out-of-memory verdict: its first line and the total it names (not the long buffer list)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "Ran out of memory" in ln or "exceeds" in ln or "RESOURCE_EXHAUSTED" in ln]
    return " | ".join(dict.fromkeys(keep or lines[:1]))[:600]
