"""Reusable tables of bad input for the entry points' tests: the classes of bad value a flag can be given, damaged
copies of a file, and the checks that an entry point answered with its exit status and one line (no traceback).

In-process where the entry point allows it (`call`: its `main(argv)` under phi_jax.cli's error policy, as
`python -m ...` runs it, minus the start-up); `run_module` for what needs a real process (signals, start-up).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from phi_jax import cli

ROOT = Path(__file__).resolve().parents[1]

# The classes of bad value, as they are written on a command line.
BAD_VALUES = {
    "negative": "-5",
    "zero": "0",
    "nan": "nan",
    "inf": "inf",
    "huge": "99999999999999999999",  # > 2**64
    "empty": "",
    "wrong type": "abc",
}


@dataclass
class Outcome:
    code: int | str  # the exit status; "traceback" when an exception escaped the error policy
    message: str  # what the user reads on stderr (the one line, or the traceback's last line)


def call(main: Callable[[list[str]], object], argv: list[str]) -> Outcome:
    """`main(argv)` in-process, under the entry points' error policy (phi_jax.cli.call)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli.call(lambda: main(argv))
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("error: ...") prints it and exits with status 1
            return Outcome(1, e.code)
        return Outcome(0 if e.code is None else e.code, err.getvalue().strip())
    except BaseException as e:  # what the user would see as a traceback
        return Outcome("traceback", f"{type(e).__name__}: {e}")
    return Outcome(0, err.getvalue().strip())


def check(outcome: Outcome, code: int, *contains: str) -> str | None:
    """None when `outcome` is exit status `code` with one line holding every `contains`; else what is wrong."""
    if outcome.code != code:
        return f"exit status {outcome.code!r}, expected {code}: {outcome.message[:300]}"
    if code != 0:
        lines = [line for line in outcome.message.splitlines() if line.strip()]
        if len(lines) != 1:
            return f"{len(lines)} lines, expected one: {outcome.message[:500]}"
        if missing := [c for c in contains if c not in lines[0]]:
            return f"{missing} not in {lines[0]!r}"
    return None


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 120,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m module args...` in a CPU-only environment without the huge-page restart (tests/runs.py)."""
    from runs import clean_env

    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


# Log lines every entry point writes at start-up, and warnings that are not the error.
NOISE = ("host memory:",)


def stderr_error_lines(stderr: str) -> list[str]:
    """The lines of a real process's stderr that a user reads as its answer (start-up log lines left out)."""
    return [line for line in stderr.splitlines() if line.strip() and not any(n in line for n in NOISE)]


def check_process(result: subprocess.CompletedProcess, code: int, *contains: str) -> str | None:
    """None when the process exited with `code`, wrote no traceback, and its last stderr line holds `contains`."""
    lines = stderr_error_lines(result.stderr)
    if result.returncode != code:
        return f"exit status {result.returncode}, expected {code}: {result.stderr[-1500:]}"
    if any("Traceback" in line for line in lines):
        return f"a traceback: {result.stderr[-1500:]}"
    if contains and (not lines or any(c not in lines[-1] for c in contains)):
        return f"{contains} not in the last line {lines[-1:]!r}"
    return None


# How a file the project reads can be damaged.
DAMAGES = ("truncated", "garbage", "empty", "missing", "wrong JSON")


def damage(path: Path, kind: str) -> None:
    """Damages `path` in place: `truncated` (its first half), `garbage` (random bytes, same size), `empty`,
    `missing`, or `wrong JSON` (valid JSON of the wrong shape)."""
    path = Path(path)
    if kind == "missing":
        path.unlink()
        return
    data = path.read_bytes()
    new = {"truncated": data[:len(data) // 2], "empty": b"", "garbage": os.urandom(max(len(data), 16)),
           "wrong JSON": json.dumps(["not", "the", "expected", {"shape": 1}]).encode()}[kind]
    path.write_bytes(new)
