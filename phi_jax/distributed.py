"""Multi-host start-up through jax.distributed (TPU pods, SLURM clusters, or explicit environment variables)."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("phi_jax")


def maybe_initialize() -> None:
    """Joins the JAX processes of a multi-host run; a single process (no cluster detected) does nothing.

    Explicit (what tools/launch_local.py sets): PHI_JAX_COORDINATOR (host:port), PHI_JAX_NUM_PROCESSES,
    PHI_JAX_PROCESS_ID, and optionally PHI_JAX_LOCAL_DEVICE_IDS and PHI_JAX_NUM_CPU_DEVICES. Otherwise
    jax.distributed's own cluster detection (TPU pod metadata, SLURM) runs
    when SLURM runs more than one task, or on a multi-host TPU VM (several TPU_WORKER_HOSTNAMES).
    """
    env = os.environ
    if "PHI_JAX_NUM_CPU_DEVICES" in env:  # fake CPU devices per process (local multi-process tests and launches)
        jax.config.update("jax_num_cpu_devices", int(env["PHI_JAX_NUM_CPU_DEVICES"]))
    if "PHI_JAX_COORDINATOR" in env:
        coordinator = env["PHI_JAX_COORDINATOR"]
        kwargs = dict(coordinator_address=coordinator, num_processes=int(env["PHI_JAX_NUM_PROCESSES"]),
                      process_id=int(env["PHI_JAX_PROCESS_ID"]),
                      initialization_timeout=int(env.get("PHI_JAX_INIT_TIMEOUT", "300")),
                      # a process whose peer died exits after this long instead of hanging in a collective
                      heartbeat_timeout_seconds=int(env.get("PHI_JAX_HEARTBEAT_TIMEOUT", "100")))
        if coordinator.startswith("127.0.0.1:") or coordinator.startswith("localhost:"):
            kwargs["coordinator_bind_address"] = coordinator  # local runs bind loopback only
        if "PHI_JAX_LOCAL_DEVICE_IDS" in env:
            kwargs["local_device_ids"] = [int(i) for i in env["PHI_JAX_LOCAL_DEVICE_IDS"].split(",")]
        jax.distributed.initialize(**kwargs)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # jax detects the SLURM / TPU-pod coordinator, process count and id itself
    else:
        return
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
