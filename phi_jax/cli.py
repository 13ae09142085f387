"""Command-line entry points: one start-up (CPU hosts' malloc on huge pages, logging) and one error policy."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("phi_jax")

# A user's mistake: a bad path, an existing output, an invalid value. Reported in one line, no traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


class RunFailure(Exception):
    """A failure whose message says what happened and what to do (e.g. a loss that stays non-finite)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error reported as one line `error: MESSAGE (see --help)`, exit status 2 (argparse's)."""

    def error(self, message: str):
        print(f"error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        sys.exit(2)


def bounded_int(low: int, high: int):
    """An argparse type: an integer in [low, high] (a value past `high` is a typo, not a plan)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer in [{low}, {high}]")
        return value

    return parse


def bounded_float(low: float, high: float, *, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with `low_open`); NaN and inf are refused."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and (low < value if low_open else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number in {'(' if low_open else '['}{low:g}, "
                                             f"{high:g}]")
        return value

    return parse


def non_empty(text: str) -> str:
    """An argparse type: a path or name that is not empty (an empty value is a mistake, never "the default")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a value or leave the flag out")
    return text


def run(main: Callable[[], object], *, failed_write: Callable[[OSError], str] = str) -> None:
    """Calls `main()` with the start-up every entry point shares; a user error, a `RunFailure` or a failed write
    exits with status 1 and one line `error: MESSAGE`. `failed_write` words an OSError (disk full, a size limit,
    permissions) for this entry point: what the failure left intact (outputs are atomic) and how to go on.
    SIGTERM, like Ctrl-C, unwinds `main()` (its clean-ups run) and exits with 128 + the signal's number and one
    line, unless the entry point handles signals itself (training: phi_jax/preemption.py).

    Before anything else, a CPU host's process restarts once with glibc's malloc on huge pages (host_memory.py)."""
    from phi_jax.host_memory import ensure_huge_pages, status

    ensure_huge_pages()
    configure_logging()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    log.info("host memory: %s", status())
    call(main, failed_write=failed_write, bounded_exit=True)


def call(main: Callable[[], object], *, failed_write: Callable[[OSError], str] = str,
         bounded_exit: bool = False) -> None:
    """`main()` under the entry points' error policy (see `run`), without the start-up: what tests call.
    `bounded_exit` (entry points only: it may end the process) bounds an interrupted process's exit
    (`exit_within`)."""
    try:
        main()
    except (*USER_ERRORS, RunFailure) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {failed_write(e)}")
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        (exit_within if bounded_exit else sys.exit)(128 + signum)


EXIT_GRACE_S = 10.0  # what an interrupted process's exit (atexit handlers, joining threads) may take


def exit_within(code: int, grace_s: float = EXIT_GRACE_S) -> None:
    """sys.exit(code), but an exit that does not finish within `grace_s` (a library thread that never ends, which
    interpreter shutdown joins: e.g. a process pool's manager after its workers were killed) ends with os._exit
    and the same status, after one line saying so. The clean-ups of `main()` have run by then."""

    def watchdog() -> None:
        time.sleep(grace_s)
        os.write(2, f"exit did not finish within {grace_s:.0f} s (a thread still running); exiting now\n".encode())
        os._exit(code)

    threading.Thread(target=watchdog, name="phi_jax-exit-watchdog", daemon=True).start()
    sys.exit(code)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def exit_on_signals_during_startup(code: int) -> None:
    """Until the entry point installs its own handlers: SIGTERM/SIGINT end the process at once with `code` and one
    line (no KeyboardInterrupt traceback from inside an import). For a start-up that has nothing to undo."""
    def handler(signum, frame):
        os.write(2, f"received {signal.Signals(signum).name} while starting: nothing to save; exiting with "
                    f"{code}\n".encode())
        os._exit(code)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def configure_logging(stream=None) -> None:
    """phi_jax's INFO lines and every library's warnings, on stderr (or `stream`) in absl's format. Left out: the
    INFO that orbax and grain log through absl (screens of it per checkpoint read or written), orbax's per-thread
    tracebacks of a failed write (phi_jax reports the error itself; also when asyncio reports them unretrieved),
    its warnings that a read-only reader is read-only, and JAX's probe of platforms this host lacks."""
    from absl.logging import PythonFormatter

    handler = logging.StreamHandler(stream)
    handler.setFormatter(PythonFormatter())
    root = logging.getLogger()
    root.handlers = [handler]  # one handler, whatever was configured before (e.g. absl's own)
    root.setLevel(logging.INFO)
    absl = logging.getLogger("absl")
    absl.setLevel(logging.WARNING)
    absl.addFilter(_without_orbax_tracebacks)
    absl.addFilter(_without_read_only_notes)
    logging.getLogger("jax._src.xla_bridge").addFilter(_without_backend_probe)
    logging.getLogger("asyncio").addFilter(_without_orbax_unretrieved)


def _without_orbax_tracebacks(record: logging.LogRecord) -> bool:
    """orbax logs a failed background write with a traceback from each of its threads: keep the first line."""
    if "orbax" in record.pathname and record.exc_info:
        record.exc_info, record.exc_text = None, None
    return True


def _without_orbax_unretrieved(record: logging.LogRecord) -> bool:
    """A failed asynchronous checkpoint write also surfaces, when its futures are collected (possibly after phi_jax
    has printed its own one-line error), as asyncio's "exception was never retrieved" with orbax's traceback."""
    tb = record.exc_info[2] if record.exc_info else None
    from_orbax = False
    while tb is not None:
        from_orbax |= "orbax" in tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return not (from_orbax and "exception was never retrieved" in record.getMessage())


def _without_read_only_notes(record: logging.LogRecord) -> bool:
    """orbax warns three times that a read-only CheckpointManager is read-only; the readers (generate, export,
    evaluate) open workdirs read-only on purpose."""
    return not (record.pathname.endswith("checkpoint_manager.py") and record.getMessage().startswith(
        ("CheckpointManagerOptions.read_only=True", "Given directory is read only")))


def _without_backend_probe(record: logging.LogRecord) -> bool:
    """JAX tries every platform it knows (TPU first) and logs each that fails at INFO, "Unable to initialize backend
    'tpu': ...", on every CPU host. JAX's own logging shows no INFO, so dropping it keeps JAX's default; a platform
    named in JAX_PLATFORMS that fails still raises."""
    return not (record.levelno == logging.INFO and record.getMessage().startswith("Unable to initialize backend"))
