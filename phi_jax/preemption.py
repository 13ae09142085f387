"""SIGTERM / SIGINT (preemption, Ctrl-C, a scheduler's time limit): the run ends with exit status 75 and nothing lost.

Until the first step of this process has finished there is nothing new to save (the newest checkpoint, or nothing,
is the whole state), so a signal exits at once, even from inside a long XLA compilation that keeps Python's own
handler from running: the C-level handler writes the signal's number to a wakeup socket that a thread watches.
After that, a signal sets a flag and the loop checkpoints at the next step boundary before exiting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("phi_jax")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written on SIGTERM/SIGINT; run the same command again
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_ON_IMMEDIATE_EXIT: list[Callable[[], None]] = []


@contextlib.contextmanager
def on_immediate_exit(cleanup: Callable[[], None]) -> Iterator[None]:
    """Runs `cleanup` (e.g. removing a temporary directory) if a signal ends the process at once while the block
    runs: an exit before the first step skips `finally` blocks. Clean-ups run newest first (phi_jax/data/prepare.py
    stops its workers, which then end with the process, before the corpus build removes their directory)."""
    _ON_IMMEDIATE_EXIT.append(cleanup)
    try:
        yield
    finally:
        _ON_IMMEDIATE_EXIT.remove(cleanup)


def _run_multiprocessing_finalizers(timeout_s: float = 2.0) -> None:
    """What interpreter exit runs and os._exit skips: a worker pool's semaphores are unlinked (else Python's resource
    tracker reports them as leaked, after removing them itself). Only the finalizers of priority >= 0 (semaphores,
    closing queues), not those that join threads, and for at most `timeout_s`: exiting matters more."""
    from multiprocessing import util

    def run() -> None:
        try:
            util._run_finalizers(0)
        except Exception as e:
            log.warning("releasing worker pools before exiting failed: %s", e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)


class Preemption:
    """Installs the handlers for the life of a run; `close()` restores the previous ones."""

    def __init__(self, before_immediate_exit=None):
        self.requested = False
        self._before_exit = before_immediate_exit  # e.g. releasing the workdir lock (os._exit skips `finally`)
        self._immediate = True  # nothing trained yet in this process: exit at once
        self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        for sig in SIGNALS:
            signal.signal(sig, self._handler)
        self._read, write = socket.socketpair()
        write.setblocking(False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="phi_jax-preemption", daemon=True).start()

    def _handler(self, signum, frame):  # (before the first step, the watching thread exits the process instead)
        if not self.requested and not self._immediate:
            log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def _watch(self) -> None:
        while data := self._read.recv(64):
            if self._immediate and any(b in SIGNALS for b in data):
                name = signal.Signals(next(b for b in data if b in SIGNALS)).name
                log.warning("received %s before the first step finished: nothing new to checkpoint; exiting with %d",
                            name, PREEMPTED_EXIT_CODE)
                for cleanup in [*reversed(_ON_IMMEDIATE_EXIT), self._before_exit]:
                    if cleanup is None:
                        continue
                    try:
                        cleanup()
                    except Exception as e:  # exiting matters more
                        log.warning("cleanup before exiting failed: %s", e)
                _run_multiprocessing_finalizers()
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(PREEMPTED_EXIT_CODE)
        self._read.close()

    def trained(self) -> None:
        """A step has finished: from now on a signal checkpoints at the next step boundary."""
        self._immediate = False

    def agreed(self) -> bool:
        """True when any process was signalled (processes must stop at the same step)."""
        import jax  # (imported here: the data modules use on_immediate_exit without JAX)

        if jax.process_count() == 1:
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())

    def close(self) -> None:
        self._immediate = False
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._write.close()  # the watching thread sees the end of the stream and stops
