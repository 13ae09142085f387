"""Cluster start-up as on a SLURM cluster or a TPU pod: jax.distributed's own detection, on 127.0.0.1.

The processes get the environment SLURM (or a multi-host TPU VM) would give them, with the coordinator on loopback.
Nothing here sets PHI_JAX_COORDINATOR: the coordinator, process count and id come from jax's cluster detection.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from runs import ROOT, TINY_RUN, clean_env, losses, make_shards, train_cmd

pytestmark = pytest.mark.multiprocess

PROBE = """
import logging
logging.basicConfig(level=logging.INFO)
from phi_jax import distributed
distributed.maybe_initialize()
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
print("ranks", multihost_utils.process_allgather(jnp.int32(jax.process_index())).tolist(), flush=True)
"""


def _port() -> int:
    from tools.launch_local import free_port

    return free_port()


def slurm_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    """What srun gives task `rank` of a 2-task step on one node; the coordinator port is pinned for the test."""
    return clean_env(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                     SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_STEP_NUM_NODES="1",
                     JAX_COORDINATOR_PORT=str(port), JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}", **extra)


def tpu_pod_env(rank: int, port: int) -> dict[str, str]:
    """A 2-host TPU VM slice as GKE describes it (worker list and id); JAX_FORCE_TPU_INIT makes jax treat this CPU
    host as a TPU VM (libtpu is installed), and the MEGASCALE_* values keep it from asking the GCE metadata server."""
    return clean_env(JAX_FORCE_TPU_INIT="1", TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="127.0.0.1,127.0.0.1",
                     TPU_WORKER_ID=str(rank), MEGASCALE_COORDINATOR_ADDRESS="", MEGASCALE_NUM_SLICES="1",
                     MEGASCALE_SLICE_ID="0", JAX_COORDINATOR_PORT=str(port),
                     JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}", PHI_JAX_INIT_TIMEOUT="60")


@pytest.mark.parametrize("cluster", ["slurm", "tpu"])
def test_cluster_detection_joins_the_processes(cluster):
    """Both processes find the same coordinator and each other: an all-gather sees ranks [0, 1] on both."""
    port = _port()
    make_env = slurm_env if cluster == "slurm" else tpu_pod_env
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, env=make_env(rank, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, out[-3000:]
        assert f"jax.distributed ({cluster}): process {rank} of 2" in out, out[-3000:]
        assert "ranks [0, 1]" in out, out[-3000:]


def test_init_timeout_applies_to_the_detected_cluster():
    """Task 1 of 2 alone: its peer never comes, so it must give up after PHI_JAX_INIT_TIMEOUT, not jax's 300 s."""
    port = _port()
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=slurm_env(1, port, PHI_JAX_INIT_TIMEOUT="5"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert time.monotonic() - start < 60


def test_a_dead_peer_under_slurm_stops_the_survivor_and_a_restart_resumes(tmp_path):
    """SIGKILL task 1 mid-run: task 0 exits non-zero within the heartbeat timeout (5 s here, 100 s by default);
    running the job again resumes from the newest checkpoint and trains on."""
    shards = make_shards(tmp_path / "data")
    workdir = tmp_path / "run"
    flags = [f"--config.data.path={shards}", *TINY_RUN, "--config.checkpoint_every=2"]

    def start(total_steps: int) -> list[subprocess.Popen]:
        port = _port()
        return [subprocess.Popen(train_cmd(workdir, *flags, f"--config.total_steps={total_steps}"), cwd=ROOT,
                                 env=slurm_env(rank, port, PHI_JAX_HEARTBEAT_TIMEOUT="5"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in range(2)]

    procs = start(100_000)
    try:
        deadline = time.monotonic() + 180
        while not (workdir / "checkpoints" / "2").exists():  # training is under way
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = procs[0].wait(timeout=120)
        assert code != 0
        assert time.monotonic() - killed_at < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    saved = max(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert saved >= 2

    procs = start(saved + 2)
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:]
    assert f"at step {saved}" in errs[0] and "resumed from" in errs[0], errs[0][-3000:]
    assert {saved + 1, saved + 2} <= set(losses(workdir))
