"""Elastic restart: a run checkpointed by 2 processes x 4 devices resumes on 1 process x 4 devices and sees the same
global batches, because the data position is the step (global batches consumed), not per-process iterator files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from runs import ROOT, TINY_RUN, clean_env, losses, make_shards, run_cli, train_cmd

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("mixture", [False, True])
def test_global_batch_k_is_the_same_for_any_process_count(shards, mixture):
    """From `start_batch` k, the processes' batches together are the examples of global batch k of one process."""
    from phi_jax.data.loader import make_dataset, make_mixture_dataset

    def batches(k, index, count, n=2):
        kw = dict(seq_len=32, global_batch_size=8, seed=3, process_index=index, process_count=count, start_batch=k,
                  prefetch=False)
        ds = make_mixture_dataset([shards, shards], [1, 2], **kw) if mixture else make_dataset(shards, **kw)
        it = iter(ds)
        return [next(it)["inputs"] for _ in range(n)]

    def rows(batch):
        return sorted(map(bytes, batch))

    one = [rows(b) for b in batches(0, 0, 1, n=5)]
    assert one[1] != one[2]
    for k in (1, 3):
        assert [rows(b) for b in batches(k, 0, 1)] == one[k:k + 2]
        for count in (2, 4):
            split = [batches(k, p, count) for p in range(count)]
            assert [rows(np.concatenate([s[i] for s in split])) for i in range(2)] == one[k:k + 2]


def test_two_processes_eight_devices_resume_on_one_process_four_devices(tmp_path, shards):
    flags = [f"--config.data.path={shards}", *TINY_RUN, "--config.checkpoint_every=3", "--config.mesh.data=-1"]
    four = clean_env(PHI_JAX_NUM_CPU_DEVICES="4")
    reference = run_cli(tmp_path / "reference", *flags, "--config.total_steps=6", env=four)
    assert reference.returncode == 0, reference.stderr[-3000:]

    launch = [sys.executable, "-m", "tools.launch_local", "--num_processes=2", "--cpu_devices_per_process=4", "--",
              *train_cmd(tmp_path / "elastic", *flags, "--config.total_steps=3")]
    first = subprocess.run(launch, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-4000:]
    assert "process 1 of 2, 4 local / 8 global devices" in first.stdout
    step3 = tmp_path / "elastic" / "checkpoints" / "3"
    assert not (step3 / "data").exists()  # no per-process iterator files
    assert json.loads((step3 / "meta" / "metadata").read_text())["data_position"] == 3 * 8  # examples consumed
    resumed = run_cli(tmp_path / "elastic", *flags, "--config.total_steps=6", env=four)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 3" in resumed.stderr

    expected, got = losses(tmp_path / "reference"), losses(tmp_path / "elastic")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    # The same global batches in another row order (and another reduction order): equal within float reordering.
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-5)
