"""Multi-host start-up through jax.distributed (TPU pods, SLURM clusters, or explicit environment variables)."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("phi_jax")


def _timeouts(env) -> dict[str, int]:
    """The start-up and heartbeat limits, the same on every path (explicit, SLURM, TPU pod)."""
    return dict(initialization_timeout=int(env.get("PHI_JAX_INIT_TIMEOUT", "300")),
                # a process whose peer died exits after this long instead of hanging in a collective
                heartbeat_timeout_seconds=int(env.get("PHI_JAX_HEARTBEAT_TIMEOUT", "100")))


def _detected_cluster(env) -> str | None:
    """'slurm' or 'tpu' when this process is one task of a multi-process job that jax.distributed can detect."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""):
        return "tpu"
    return None


def _is_loopback(address: str) -> bool:
    return address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]")


def maybe_initialize() -> None:
    """Joins the JAX processes of a multi-host run; a single process (no cluster detected) does nothing.

    Explicit (what tools/launch_local.py sets): PHI_JAX_COORDINATOR (host:port), PHI_JAX_NUM_PROCESSES,
    PHI_JAX_PROCESS_ID, and optionally PHI_JAX_LOCAL_DEVICE_IDS and PHI_JAX_NUM_CPU_DEVICES. Otherwise
    jax.distributed's own cluster detection reads the coordinator, process count and id: under SLURM (more than one
    task in the step) and on a multi-host TPU VM (several TPU_WORKER_HOSTNAMES). PHI_JAX_INIT_TIMEOUT and
    PHI_JAX_HEARTBEAT_TIMEOUT (seconds) apply on every path.
    """
    env = os.environ
    if "PHI_JAX_NUM_CPU_DEVICES" in env:  # fake CPU devices per process (local multi-process tests and launches)
        jax.config.update("jax_num_cpu_devices", int(env["PHI_JAX_NUM_CPU_DEVICES"]))
    kwargs = _timeouts(env)
    if "PHI_JAX_COORDINATOR" in env:
        coordinator = env["PHI_JAX_COORDINATOR"]
        kwargs.update(coordinator_address=coordinator, num_processes=int(env["PHI_JAX_NUM_PROCESSES"]),
                      process_id=int(env["PHI_JAX_PROCESS_ID"]))
        if _is_loopback(coordinator):
            kwargs["coordinator_bind_address"] = coordinator  # local runs bind loopback only
        if "PHI_JAX_LOCAL_DEVICE_IDS" in env:
            kwargs["local_device_ids"] = [int(i) for i in env["PHI_JAX_LOCAL_DEVICE_IDS"].split(",")]
        source = "PHI_JAX_COORDINATOR"
    elif cluster := _detected_cluster(env):
        source = cluster  # jax detects the coordinator, process count and id itself; only the limits are ours
    else:
        return
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", source, jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
