"""The pre-flight memory check (phi_jax/memory_check.py): a run that cannot fit stops with the figures and the knobs,
before any parameter is allocated."""

from __future__ import annotations

import resource
import subprocess
import sys

import jax
import pytest
from runs import ROOT, clean_env, make_shards

from phi_jax import memory_check
from phi_jax.config import Compute, PhiConfig
from phi_jax.optim import make_optimizer
from phi_jax.run_config import base_config
from phi_jax.sharding import make_mesh
from phi_jax.train import train
from phi_jax.trainer import build_trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


def test_budget_figures(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   12345678 kB\n")
    assert memory_check.host_available_bytes(str(meminfo)) == 12345678 * 1024
    assert [memory_check._parse_bytes(t) for t in ("123", "8G", "8GiB", "1.5M")] == [123, 8 * 2**30, 8 * 2**30,
                                                                                      3 * 2**19]
    monkeypatch.setenv(memory_check.AVAILABLE_ENV, "3G")
    assert memory_check.budget() == (3 * 2**30, True, "$PHI_JAX_AVAILABLE_MEMORY")


def test_phi15_on_a_small_host_stops_before_allocating_anything(tmp_path, shards):
    """phi-1.5's fp32 state (17 GB) on a host that allows 8 GiB: one line with the figures, no allocation (the
    child's peak resident memory stays a small fraction of the state), no checkpoint."""
    cmd = [sys.executable, "-m", "phi_jax.train", "--config=configs/phi15.py", f"--workdir={tmp_path}",
           f"--config.data.path={shards}", "--config.data.mixture_weights=", "--config.batch_size=2",
           "--config.micro_batch_per_device=0",
           "--config.seq_len=64"]
    result = subprocess.run(cmd,
                            cwd=ROOT, env=clean_env(PHI_JAX_AVAILABLE_MEMORY="8G"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "The run does not fit: the train state plus its gradients (a lower bound) needs 21.1" in error, error
    assert "$PHI_JAX_AVAILABLE_MEMORY is 8.00 GiB. Nothing was allocated." in error
    assert "--config.sharding=fsdp" in error and "smaller --config.model" in error
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far
    assert peak_gib < 4, peak_gib
    assert not any((tmp_path / "checkpoints").iterdir())


def test_a_step_whose_activations_do_not_fit_stops_after_compiling(tmp_path, shards, monkeypatch):
    """A budget just above the state plus gradients: the first check passes, the compiled step's figures (which add
    the activations) do not, and the error names the micro-batch and remat knobs."""
    c = base_config()
    c.model, c.seq_len, c.batch_size, c.total_steps, c.eval_every = "tiny", 256, 64, 2, 0
    c.data.path = str(shards)
    mesh = make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    target = build_trainer(PhiConfig.preset("tiny"), Compute(), make_optimizer(1e-3), mesh, c.sharding).abstract_state
    state_and_grads = memory_check._per_device_bytes(target) + memory_check._per_device_bytes(target.params)
    monkeypatch.setenv(memory_check.AVAILABLE_ENV, str(state_and_grads * jax.local_device_count() + 4096))
    with pytest.raises(memory_check.InsufficientMemoryError,
                       match=r"the compiled train step \(.* of it temporaries\) needs .*micro_batch_per_device"):
        train(c, tmp_path)
    assert not any((tmp_path / "checkpoints").iterdir())
