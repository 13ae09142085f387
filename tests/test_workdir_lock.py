"""One trainer per workdir: a second trainer is refused with the holder's name; a dead run's lock is taken over."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from runs import ROOT, TINY_RUN, clean_env, make_shards, run_cli, train_cmd

from phi_jax.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError


def _write_lock(workdir, **fields):
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01T00:00:00+00:00",
              "token": "theirs", "heartbeat": time.time(), **fields}
    (workdir / LOCK_NAME).write_text(json.dumps(holder))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_holder_refuses_and_a_stale_one_is_taken_over(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "phi_jax")
    _write_lock(tmp_path)  # this (live) process, fresh heartbeat
    with pytest.raises(WorkdirLockedError, match=rf"in use by another trainer \(host {socket.gethostname()}, pid "
                                                 rf"{os.getpid()}, started 2026-01-01"):
        WorkdirLock(tmp_path).acquire()
    _write_lock(tmp_path, host="elsewhere", heartbeat=time.time() - 10)  # another host, recent heartbeat
    with pytest.raises(WorkdirLockedError, match="host elsewhere"):
        WorkdirLock(tmp_path, stale_after_s=60).acquire()

    for stale, reason in [({"pid": _dead_pid()}, "is gone"),
                          ({"host": "elsewhere", "heartbeat": time.time() - 61}, "heartbeat is 61 s old")]:
        _write_lock(tmp_path, **stale)
        caplog.clear()
        with WorkdirLock(tmp_path, stale_after_s=60) as lock:
            held = json.loads((tmp_path / LOCK_NAME).read_text())
            assert held["token"] == lock.token and held["pid"] == os.getpid()
            assert reason in caplog.text and "taking over the stale workdir lock" in caplog.text
        assert not (tmp_path / LOCK_NAME).exists()  # released
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left behind


def test_the_heartbeat_refreshes_and_a_release_keeps_a_new_holders_lock(tmp_path):
    lock = WorkdirLock(tmp_path, refresh_s=0.05)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    _write_lock(tmp_path, token="new-holder")  # someone took it over (it looked stale to them)
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "new-holder"


def test_a_second_trainer_is_refused_and_the_first_releases_on_exit(tmp_path):
    """Two real `python -m phi_jax.train` on one workdir: the second stops at once naming the first."""
    shards = make_shards(tmp_path / "data")
    flags = [f"--config.data.path={shards}", *TINY_RUN, "--config.total_steps=100000"]
    first = subprocess.Popen(train_cmd(tmp_path / "run", *flags), cwd=ROOT, env=clean_env(), text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / LOCK_NAME).exists():  # taken before the data is read or anything compiled
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.3)
        second = run_cli(tmp_path / "run", *flags)
        assert second.returncode == 1
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"pid {first.pid}," in errors[0] and "in use by another trainer" in errors[0], \
            second.stderr[-2000:]
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 75
    finally:
        if first.poll() is None:
            first.kill()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
