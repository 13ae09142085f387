"""Interruptions and faults: real subprocesses and real signals; losses after a resume compared bit for bit."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest
from runs import ROOT, TINY_RUN, clean_env, losses, make_shards, metrics, run_cli, train_cmd
from runs import documents as runs_documents

from phi_jax import train as train_module
from phi_jax.checkpoint import Checkpointer
from phi_jax.run_config import base_config

STEPS = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference_workdir(shards, tmp_path_factory):
    """An uninterrupted run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_cli(workdir, *flags(shards, 4))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def reference(reference_workdir):
    return losses(reference_workdir)


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


@pytest.mark.parametrize("sig,checkpoint_every", [
    (signal.SIGTERM, 1000),  # no periodic checkpoint: only the signal's
    (signal.SIGTERM, 1),  # every step ends in a checkpoint: the signal lands on a checkpoint step
    pytest.param(signal.SIGINT, 1000, marks=pytest.mark.slow),
], ids=["SIGTERM", "SIGTERM-on-a-checkpoint-step", "SIGINT"])
def test_preemption_signal_checkpoints_and_exits_75(tmp_path, shards, reference, sig, checkpoint_every):
    proc = start(tmp_path, shards, checkpoint_every=checkpoint_every)
    wait_for(lambda: logged_steps(tmp_path) >= 3, proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == train_module.PREEMPTED_EXIT_CODE, proc.stderr.read()[-3000:]
    saved = Checkpointer(tmp_path).all_steps()
    assert 3 <= saved[-1] < STEPS
    assert len(saved) == 1 if checkpoint_every > STEPS else saved == list(range(saved[-1] - 2, saved[-1] + 1))
    result = finish_and_compare(tmp_path, shards, reference)
    assert f"resumed from {tmp_path / 'checkpoints'} at step {saved[-1]}" in result.stderr


def test_sigterm_while_compiling_exits_75_within_seconds(tmp_path, shards):
    """Before the first step finishes there is nothing new to save: a SIGTERM that lands inside XLA's compilation
    of the step (which keeps Python's signal handlers from running until it returns) ends the run at once."""
    stderr = tmp_path / "stderr.txt"
    cmd = train_cmd(tmp_path / "run", f"--config.data.path={shards}", *TINY_RUN, "--config.model=quickstart",
                    "--config.remat=full")  # a step whose compilation takes ~15 s on a 2-core CPU
    with stderr.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while "compiling the train step" not in stderr.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.5)  # into XLA's compilation
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    log = stderr.read_text()
    assert code == train_module.PREEMPTED_EXIT_CODE, log[-3000:]
    assert elapsed < 5, elapsed
    assert "memory check: the compiled train step" not in log  # the signal landed before compilation finished
    assert "received SIGTERM before the first step finished: nothing new to checkpoint" in log
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or logged_steps(tmp_path / "run") == 0
    assert Checkpointer(tmp_path / "run").all_steps() == []


def test_sigkill_inside_a_checkpoint_write_resumes_from_the_newest_complete_checkpoint(tmp_path, shards, reference):
    """kill -9 while a checkpoint is being written, shown by its temporary directory: the process is stopped
    (SIGSTOP) when one appears and killed only if it is still there, then the run restarts from a complete
    checkpoint, reports the partial one, and matches the uninterrupted run bit for bit."""
    proc = start(tmp_path, shards, checkpoint_every=1)
    ckpts = tmp_path / "checkpoints"
    partial = lambda: sorted(p.name for p in ckpts.iterdir() if "tmp" in p.name) if ckpts.is_dir() else []
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint write was caught"
        if logged_steps(tmp_path) >= 2 and partial():
            proc.send_signal(signal.SIGSTOP)
            if caught := partial():
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert partial() == caught  # the kill landed inside that write
    result = finish_and_compare(tmp_path, shards, reference)
    assert f"ignoring incomplete checkpoint(s) {caught}" in result.stderr


def config(shards: Path, **kw):
    c = base_config()
    c.model, c.seq_len, c.batch_size, c.total_steps, c.eval_every = "tiny", 32, 8, 6, 0
    c.data.path = str(shards)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def poison_parameters(monkeypatch):
    """Start from parameters holding a NaN (as a corrupted init or a bad fine-tuning source would)."""
    from phi_jax.trainer import Trainer

    create = Trainer.init_state

    def poisoned(*args, **kwargs):
        state = create(*args, **kwargs)
        bias = state.params["final_layernorm"]["bias"]
        params = {**state.params, "final_layernorm": {**state.params["final_layernorm"],
                                                     "bias": bias.at[0].set(jnp.nan)}}
        return state.replace(params=params)

    monkeypatch.setattr(Trainer, "init_state", poisoned)


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


def test_disk_error_reported_by_the_cli(tmp_path, shards):
    (tmp_path / "run").write_text("a file where the workdir should be")
    result = run_cli(tmp_path / "run", *flags(shards, 4), timeout=120)
    assert result.returncode == 1
    assert "exists" in result.stderr or "Not a directory" in result.stderr




def limit_file_size(nbytes: int, cmd: list[str]) -> list[str]:
    """`cmd` run in a process that may not write a file larger than `nbytes` (the OS refuses: EFBIG)."""
    limit = (f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({nbytes}, {nbytes})); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", limit, *cmd]


def test_file_size_limit_during_an_async_checkpoint_keeps_the_previous_one(tmp_path, shards, reference):
    """A real OS limit (RLIMIT_FSIZE, as a full disk or a quota would) makes the asynchronous write of step 8 fail:
    a one-line error, exit status 1, checkpoint 4 intact; the failed write's directory is reported and never loaded
    on the restart, and resuming from step 4 matches the uninterrupted run."""
    first = run_cli(tmp_path, *flags(shards, 4), "--config.total_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    limited = subprocess.run(limit_file_size(256 * 1024, train_cmd(tmp_path, *flags(shards, 4))), cwd=ROOT,
                             env=clean_env(), capture_output=True, text=True, timeout=300)  # the state is ~2 MB
    assert limited.returncode == 1, limited.stderr[-3000:]
    # One error line. (Threads of orbax and tensorstore that outlive the failed write may print tracebacks of their
    # own while the interpreter shuts down, before or after it: not phi_jax's to word.)
    errors = [line for line in limited.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, limited.stderr[-3000:]
    error = errors[0]
    assert "Writing a checkpoint to" in error and "File too large" in error, limited.stderr[-3000:]
    assert "the newest complete checkpoint, step 4, is intact" in error
    partial = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name)
    assert partial == ["8.orbax-checkpoint-tmp"]  # the failed write's directory: an incomplete checkpoint
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    result = finish_and_compare(tmp_path, shards, reference)  # resumes from 4, never from the partial 8
    assert f"ignoring incomplete checkpoint(s) {partial}" in result.stderr and "at step 4" in result.stderr


def test_file_size_limit_during_an_export_keeps_the_previous_export(tmp_path, reference_workdir):
    out = tmp_path / "export"
    cmd = [sys.executable, "-m", "tools.export_hf", f"--model={reference_workdir}", f"--out={out}"]
    exported = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert len(exported.stderr.splitlines()) <= 5, exported.stderr  # phi_jax's few lines, no screens of orbax's
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "model.safetensors" in before and "tokenizer.json" in before
    for target in (out, tmp_path / "new"):
        result = subprocess.run(limit_file_size(64 * 1024, [*cmd[:-1], f"--out={target}", "--overwrite"]), cwd=ROOT,
                                env=clean_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "File too large" in last, result.stderr[-3000:]
        assert ("the previous export is intact" if target == out else "nothing was written") in last
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` installed (/proc/PID/status, SigCgt)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_starting_exits_75_in_one_line(tmp_path, sig):
    """SIGINT/SIGTERM while `python -m phi_jax.train` imports JAX (its first second): exit 75 as documented, one
    line, no KeyboardInterrupt traceback. The signal is sent as soon as the handler is installed (SigCgt shows it),
    which is before the imports that take that second."""
    proc = subprocess.Popen(train_cmd(tmp_path / "run", *TINY_RUN), cwd=ROOT, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 75, stderr
    assert stderr.splitlines() == [f"received {sig.name} while starting: nothing to save; exiting with 75"], stderr
    assert not (tmp_path / "run").exists()


def _big_jsonl(path: Path, n: int = 6000) -> Path:
    import json

    docs = runs_documents(30)
    path.write_text("".join(json.dumps({"text": docs[i % len(docs)] + f"\n# {i}\n"}) + "\n" for i in range(n)))
    return path


def test_sigterm_or_sigkill_to_prepare_data_leaves_no_worker_behind(tmp_path, shards):
    """prepare_data --workers=2, signalled while its workers tokenize: SIGTERM unwinds it (workers stopped, finished
    pieces kept and said so, one line, exit 143); after SIGKILL (no clean-up of any kind) the workers end with it
    (PR_SET_PDEATHSIG). Before, both left two workers tokenizing on their own."""
    src = _big_jsonl(tmp_path / "big.jsonl")
    tok = next(shards.glob("*.model"))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = tmp_path / f"out-{sig.name}"
        cmd = [sys.executable, "-m", "tools.prepare_data", "--source=jsonl", f"--jsonl={src}", f"--tokenizer={tok}",
               f"--out={out}", "--workers=2", "--docs_per_shard=100"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 120
        while len(workers := _children(proc.pid)) < 2 or not (tmp_path / f".{out.name}.partial").is_dir() or not \
                list((tmp_path / f".{out.name}.partial").glob("piece-*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        proc.send_signal(sig)
        stderr = proc.communicate(timeout=60)[1]
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), (sig.name, workers, stderr[-2000:])
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
            assert "Traceback" not in stderr, stderr[-3000:]
            lines = [line for line in stderr.splitlines() if "host memory" not in line]
            assert lines[-1] == "interrupted by SIGTERM", stderr[-3000:]
            assert "finished piece(s) in" in lines[-2] and "the same command resumes from them" in lines[-2]
        else:
            assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigterm_while_building_the_default_corpus_leaves_nothing_behind(tmp_path):
    """The trainer building the embedded corpus (its tokenizer trained, its workers tokenizing), SIGTERM'd: exit 75,
    no worker left, no temporary directory left in the cache."""
    cache = tmp_path / "cache"
    proc = subprocess.Popen(train_cmd(tmp_path / "run", *TINY_RUN, "--config.data.default_vocab_size=512"), cwd=ROOT,
                            env=clean_env(PHI_JAX_CACHE=str(cache)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while len(workers := _children(proc.pid)) < 2 or not list(cache.glob(".*.tmp-*/.data.partial/piece-*.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 75, stderr[-3000:]
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), workers
    assert not list(cache.glob(".*.tmp-*")), sorted(p.name for p in cache.iterdir())
    assert "Traceback" not in stderr and "leaked semaphore" not in stderr, stderr[-3000:]
