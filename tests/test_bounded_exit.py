"""An interrupted entry point ends in bounded time even when a library thread never ends: the worker pool's
shutdown is bounded (phi_jax.data.prepare._stop) and so is the interpreter's exit (phi_jax.cli.exit_within)."""

from __future__ import annotations

import concurrent.futures
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from phi_jax.data import prepare

ROOT = Path(__file__).resolve().parents[1]


def test_a_pool_whose_shutdown_hangs_is_left_after_the_timeout(caplog):
    pool = concurrent.futures.ThreadPoolExecutor(1)
    never = threading.Event()
    pool.shutdown = lambda **kwargs: never.wait()  # a manager thread blocked on a queue of killed workers
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="phi_jax"):
        prepare._stop(pool, timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert "did not shut down within" in caplog.text
    never.set()


def test_an_exit_that_joins_a_thread_forever_ends_with_the_status_after_the_grace():
    code = textwrap.dedent("""
        import threading
        from phi_jax.cli import exit_within
        threading.Thread(target=threading.Event().wait).start()  # non-daemon: interpreter shutdown joins it
        exit_within(143, grace_s=1.0)
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert time.monotonic() - start < 30
    assert proc.stderr.strip().endswith("exit did not finish within 1 s (a thread still running); exiting now")


def test_an_exit_with_nothing_left_running_is_a_plain_exit():
    code = "from phi_jax.cli import exit_within; exit_within(130, grace_s=30.0)"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and "exit did not finish" not in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - start < 25  # not the grace: the watchdog is a daemon thread and dies with the exit


def _sleep(payload: bytes) -> int:
    time.sleep(60)
    return len(payload)


def test_killing_the_workers_while_pieces_wait_in_the_queue_does_not_block_the_shutdown(caplog):
    """Pieces larger than the pipe's buffer wait in the pool's call queue while its one worker is busy; `_stop`
    kills the worker. Before Python 3.11.4 (Debian 12's python3 is 3.11.2) the queue's feeder thread then blocked
    forever writing into a pipe nobody reads, and so did the pool's shutdown."""
    import multiprocessing

    pool = concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn"))
    futures = [pool.submit(_sleep, bytes(1 << 20)) for _ in range(6)]
    deadline = time.monotonic() + 60
    while not prepare._workers(pool) or not any(f.running() for f in futures):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the feeder is now blocked on the full pipe
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="phi_jax"):
        prepare._stop(pool, timeout_s=20)
    assert "did not shut down" not in caplog.text
    assert time.monotonic() - start < 20
