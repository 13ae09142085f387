"""Interruptions and faults: real subprocesses and real signals; losses after a resume compared bit for bit."""

from __future__ import annotations

import errno
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from runs import ROOT, TINY_RUN, clean_env, losses, make_shards, metrics, run_cli, train_cmd

from phi_jax import train as train_module
from phi_jax.checkpoint import Checkpointer
from phi_jax.run_config import base_config

STEPS = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """Losses of an uninterrupted run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_cli(workdir, *flags(shards, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    return losses(workdir)


def flags(shards: Path, checkpoint_every: int) -> list[str]:
    return [f"--config.data.path={shards}", *TINY_RUN, f"--config.total_steps={STEPS}",
            f"--config.checkpoint_every={checkpoint_every}"]


def start(workdir: Path, shards: Path, checkpoint_every: int) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(workdir, *flags(shards, checkpoint_every)), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def logged_steps(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return max((r["step"] for r in metrics(workdir) if "loss" in r), default=0) if path.exists() else 0


def finish_and_compare(workdir: Path, shards: Path, reference: dict) -> subprocess.CompletedProcess:
    result = run_cli(workdir, *flags(shards, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(workdir) == reference  # every step, bit for bit, including those after the restart
    return result


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_checkpoints_and_exits_75(tmp_path, shards, reference, sig):
    proc = start(tmp_path, shards, checkpoint_every=1000)  # no periodic checkpoint: only the signal's
    wait_for(lambda: logged_steps(tmp_path) >= 3, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == train_module.PREEMPTED_EXIT_CODE, proc.stderr.read()[-3000:]
    saved = Checkpointer(tmp_path).all_steps()
    assert len(saved) == 1 and 3 <= saved[0] < STEPS
    result = finish_and_compare(tmp_path, shards, reference)
    assert f"resumed from {tmp_path / 'checkpoints'} at step {saved[0]}" in result.stderr


def test_sigkill_at_any_moment_resumes_from_the_newest_complete_checkpoint(tmp_path, shards, reference):
    """kill -9 while checkpoints are being written every 2 steps (as soon as a temporary checkpoint directory
    appears, or after step 5), then restart: the run resumes from a complete checkpoint and matches bitwise."""
    proc = start(tmp_path, shards, checkpoint_every=2)
    ckpts = tmp_path / "checkpoints"
    writing = lambda: ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir())
    wait_for(lambda: logged_steps(tmp_path) >= 3 and (writing() or logged_steps(tmp_path) >= 5), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    finish_and_compare(tmp_path, shards, reference)


def test_an_incomplete_checkpoint_is_reported_and_never_loaded(tmp_path, shards, reference):
    result = run_cli(tmp_path, *flags(shards, 4), "--config.total_steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = tmp_path / "checkpoints"
    partial = ckpts / "10.orbax-checkpoint-tmp-1234"  # what a crash during the write of step 10 leaves
    shutil.copytree(ckpts / "8", partial)
    shutil.rmtree(partial / "state")
    result = finish_and_compare(tmp_path, shards, reference)
    assert "ignoring incomplete checkpoint(s) ['10.orbax-checkpoint-tmp-1234']" in result.stderr
    assert "at step 8" in result.stderr


def config(shards: Path, **kw):
    c = base_config()
    c.model, c.seq_len, c.batch_size, c.total_steps, c.eval_every = "tiny", 32, 8, 6, 0
    c.data.path = str(shards)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def poison_parameters(monkeypatch):
    """Start from parameters holding a NaN (as a corrupted init or a bad fine-tuning source would)."""
    create = train_module.create_train_state

    def poisoned(*args, **kwargs):
        state = create(*args, **kwargs)
        bias = state.params["final_layernorm"]["bias"]
        params = {**state.params, "final_layernorm": {**state.params["final_layernorm"],
                                                     "bias": bias.at[0].set(jnp.nan)}}
        return state.replace(params=params)

    monkeypatch.setattr(train_module, "create_train_state", poisoned)


def test_non_finite_parameters_are_never_checkpointed(tmp_path, shards, monkeypatch):
    poison_parameters(monkeypatch)
    with pytest.raises(train_module.NonFiniteError, match="not checkpointing over the last good state"):
        train_module.train(config(shards, checkpoint_every=2, max_consecutive_skips=100), tmp_path)
    assert Checkpointer(tmp_path).all_steps() == []
    assert all(r["skipped"] == 1 for r in metrics(tmp_path) if "skipped" in r)


def test_consecutive_skips_stop_the_run(tmp_path, shards, monkeypatch):
    poison_parameters(monkeypatch)
    with pytest.raises(train_module.NonFiniteError, match="3 consecutive updates had a non-finite loss"):
        train_module.train(config(shards, checkpoint_every=1000, max_consecutive_skips=3), tmp_path)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, shards, monkeypatch):
    c = config(shards, checkpoint_every=2)
    save = Checkpointer.save

    def failing_save(self, step, *args):
        if step == 4:
            (self.directory / "4.orbax-checkpoint-tmp-99").mkdir()  # a half-written directory
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args)

    monkeypatch.setattr(Checkpointer, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train_module.train(c, tmp_path)
    monkeypatch.undo()
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [2]
    c.total_steps = 2  # the intact checkpoint restores, and resuming from it needs no more steps
    assert jax.tree.leaves(train_module.train(c, tmp_path)) is not None


def test_disk_error_reported_by_the_cli(tmp_path, shards):
    (tmp_path / "run").write_text("a file where the workdir should be")
    result = run_cli(tmp_path / "run", *flags(shards, 4), timeout=120)
    assert result.returncode == 1
    assert "exists" in result.stderr or "Not a directory" in result.stderr


def test_export_failing_mid_write_leaves_the_previous_export_intact(tmp_path, monkeypatch):
    from phi_jax.config import PhiConfig
    from phi_jax.hf import io as hf_io
    from phi_jax.hf import save_pretrained
    from phi_jax.model import init_model

    model = init_model(PhiConfig.preset("tiny"))
    out = tmp_path / "export"
    save_pretrained(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(model, out, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(model, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind
