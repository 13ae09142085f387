"""The sandbox against hostile programs: each ends as failed within its timeout, the parent lives, no file outside
the sandbox changes, and no process of the program outlives it. Every hostile run is bounded (a few seconds, at
most 16 processes of 256 MiB each): the machine is shared."""

import hashlib
import os
import socket
import time
from pathlib import Path

import pytest

from phi_jax.evals.sandbox import Limits, Sandbox

TIGHT = Limits(timeout=1.5, memory_bytes=256 << 20, nproc=16, file_bytes=1 << 20, output_bytes=4096)


@pytest.fixture(scope="module")
def guarded():
    return Sandbox(TIGHT)


@pytest.fixture(scope="module")
def bare():
    """The kernel's layers alone (no Python guards): what ctypes-level code would meet."""
    return Sandbox(TIGHT, guards=False)


def _uid_of(result) -> int:
    return int(result.stdout.split()[0])


def _alive_processes_of(uid: int) -> list[int]:
    alive = []
    for name in os.listdir("/proc"):
        try:
            if (name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
                    and Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0] != "Z"):
                alive.append(int(name))
        except FileNotFoundError:
            pass
    return alive


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root with its mode and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p)] = f"{st.st_mode:o} " + (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


def test_an_honest_program_passes_and_its_output_is_captured(guarded):
    r, = guarded.run(["import math\nprint(math.factorial(5))\n"])
    assert (r.status, r.stdout) == ("passed", "120\n")


@pytest.mark.parametrize("program", ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n"])
def test_exiting_before_the_last_line_is_a_failure(guarded, program):
    r, = guarded.run([program + "print('the tests would run here')\n"])
    assert r.status == "failed"


@pytest.mark.parametrize("program", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_an_infinite_loop_ends_at_its_timeout(guarded, program):
    start = time.monotonic()
    r, = guarded.run([program])
    assert r.status == "timeout"
    assert TIGHT.timeout <= time.monotonic() - start < TIGHT.timeout + 2


def test_a_64_gb_allocation_fails_at_once(guarded):
    r, = guarded.run(["x = bytearray(64 * 2**30)\n"])
    assert r.status == "failed" and "MemoryError" in r.stderr and r.seconds < TIGHT.timeout


@pytest.mark.parametrize("sandbox", ["guarded", "bare"])
def test_a_fork_bomb_is_bounded_and_leaves_no_process(request, sandbox):
    sb = request.getfixturevalue(sandbox)
    bomb = "import os\nprint(os.getuid(), flush=True)\nwhile True:\n    os.fork()\n"
    start = time.monotonic()
    r, = sb.run([bomb])
    assert r.status in ("failed", "timeout") and time.monotonic() - start < TIGHT.timeout + 2
    if sb.own_uid:
        assert _alive_processes_of(_uid_of(r)) == []


def test_a_process_that_leaves_the_group_is_killed_too(bare):
    if not (bare.own_uid or bare.namespaces):
        pytest.skip("this host gives programs neither a uid nor a PID namespace of their own")
    program = ("import os, time\nprint(os.getuid(), flush=True)\nif os.fork() == 0:\n    os.setsid()\n"
               "    time.sleep(60)\nos._exit(0)\n")
    r, = bare.run([program])
    assert r.status == "failed"  # it exited early
    assert _alive_processes_of(_uid_of(r)) == []


@pytest.mark.parametrize("sandbox", ["guarded", "bare"])
def test_files_outside_the_sandbox_are_left_alone(request, sandbox, tmp_path):
    sb = request.getfixturevalue(sandbox)
    if not sb.own_uid:
        pytest.skip("without a uid of their own (root only), a program may write this user's files (open() is "
                    "not guarded)")
    keep = tmp_path / "data" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    os.chmod(tmp_path, 0o755)  # readable and enterable by anyone, as a home or checkpoint directory often is
    os.chmod(keep.parent, 0o755)
    os.chmod(keep, 0o644)
    escape = Path("/tmp") / f"phi_jax_sandbox_escape_{os.getpid()}_{sandbox}"
    before = _snapshot(tmp_path)
    programs = [f"open({str(keep)!r}, 'w').write('gone')\n",
                f"open({str(keep)!r}, 'a').write('more')\n",
                f"import os\nos.remove({str(keep)!r})\n",
                f"import os\nos.rename({str(keep)!r}, {str(keep)!r} + '.moved')\n",
                f"import os\nos.chmod({str(keep)!r}, 0o777)\n",
                f"import shutil\nshutil.rmtree({str(keep.parent)!r})\n",
                f"open({str(keep.parent / 'new.txt')!r}, 'w').write('new')\n"]
    results = sb.run(programs)
    assert [r.status for r in results] == ["failed"] * len(programs), [r.stderr[-300:] for r in results]
    # A world-writable directory: with namespaces the program writes into its own /tmp, which vanishes with it.
    sb.run([f"open({str(escape)!r}, 'w').write('x')\n"])
    created = escape.exists()
    escape.unlink(missing_ok=True)
    assert not (created and sb.namespaces)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("sandbox", ["guarded", "bare"])
def test_no_socket_reaches_127_0_0_1(request, sandbox):
    sb = request.getfixturevalue(sandbox)
    if sandbox == "bare" and not sb.namespaces:
        pytest.skip("this host refuses network namespaces: only the Python guard blocks sockets")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        r, = sb.run([f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                     "s.sendall(b'leak')\n"])
        assert r.status == "failed"
        with pytest.raises(BlockingIOError):
            server.accept()


@pytest.mark.parametrize("sandbox", ["guarded", "bare"])
def test_killing_the_parent_fails_and_the_parent_lives(request, sandbox):
    sb = request.getfixturevalue(sandbox)
    if sandbox == "bare" and not (sb.own_uid or sb.namespaces):
        pytest.skip("without a uid or a PID namespace of its own, only the Python guard stops os.kill")
    r, = sb.run([f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n"])
    assert r.status == "failed"
    assert r.seconds < TIGHT.timeout


def test_output_is_bounded(guarded):
    r, = guarded.run(["while True:\n    print('x' * 1000)\n"])
    assert r.status == "failed" and "File too large" in r.stderr  # stdout reached the file-size limit
    assert len(r.stdout) <= TIGHT.output_bytes


def test_programs_run_in_parallel_and_keep_their_order():
    sb = Sandbox(Limits(timeout=5.0), workers=2)
    results = sb.run([f"import time\ntime.sleep(0.5)\nprint({i})\n" for i in range(4)])
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]
    assert all(r.passed for r in results)


def test_isolation_is_reported_and_none_is_explicit():
    sb = Sandbox(TIGHT, workers=1)
    assert set(sb.isolation) >= {"mode", "namespaces", "own_uid", "guards", "limits"}
    with pytest.raises(ValueError, match="sandbox mode='off'"):
        Sandbox(mode="off")
    unguarded = Sandbox(TIGHT, mode="none")
    assert unguarded.isolation["guards"] is False and unguarded.run(["print(1)"])[0].stdout == "1\n"
