"""Two real processes joined through jax.distributed on 127.0.0.1 (gloo), the code path of a TPU pod or GPU cluster."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from runs import ROOT, TINY_RUN, clean_env, losses, make_shards, metrics, run_cli, train_cmd

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


def test_two_processes_match_one_process_with_the_same_devices(tmp_path, shards):
    """2 processes x 2 CPU devices (through tools.launch_local) == 1 process x 4 devices, step by step.

    FSDP over all 4 devices, and a hybrid mesh (data parallel across the processes, FSDP inside each), as on a
    multi-node cluster. Each process reads its own half of every batch."""
    flags = [f"--config.data.path={shards}", *TINY_RUN, "--config.total_steps=4", "--config.checkpoint_every=2",
             "--config.sharding=fsdp"]
    single = run_cli(tmp_path / "single", *flags, "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                     env=clean_env(PHI_JAX_NUM_CPU_DEVICES="4"))
    assert single.returncode == 0, single.stderr[-3000:]
    for name, mesh in [("fsdp", ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]),
                       ("hybrid", ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.dcn_data=2"])]:
        launch = [sys.executable, "-m", "tools.launch_local", "--num_processes=2", "--cpu_devices_per_process=2", "--",
                  *train_cmd(tmp_path / name, *flags, *mesh)]
        multi = subprocess.run(launch, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert multi.returncode == 0, multi.stdout[-4000:]
        assert "process 1 of 2, 2 local / 4 global devices" in multi.stdout
        expected, got = losses(tmp_path / "single"), losses(tmp_path / name)
        assert sorted(got) == [1, 2, 3, 4]
        np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)],
                                   rtol=1e-5, err_msg=name)
        rows = [r["step"] for r in metrics(tmp_path / name) if "loss" in r]
        assert rows == [1, 2, 3, 4], rows  # only process 0 writes metrics: each step once, not once per process
        assert sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]

