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
