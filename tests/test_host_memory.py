"""glibc's malloc on transparent huge pages: when the entry points restart themselves, and that it takes effect."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from runs import ROOT, clean_env, train_cmd

from phi_jax import host_memory

GLIBC = (2, 36)
APPLIES = host_memory.thp_mode() == "madvise" and (host_memory.glibc_version() or (0, 0)) >= (2, 35)
needs_thp = pytest.mark.skipif(not APPLIES, reason="needs Linux with glibc >= 2.35 and THP in 'madvise' mode")


@pytest.mark.parametrize("environ,mode,glibc,reexec,says", [
    ({}, "madvise", GLIBC, True, "re-executing with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC, True, "re-executing"),
    ({"PHI_JAX_HUGE_PAGES": "0"}, "madvise", GLIBC, False, "malloc left as it is"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, False, "as GLIBC_TUNABLES sets them"),
    ({}, "always", GLIBC, False, "on (the kernel's mode is 'always')"),
    ({}, "never", GLIBC, False, "off (the kernel's mode is never)"),
    ({}, None, GLIBC, False, "off (the kernel's mode is absent)"),
    ({}, "madvise", (2, 31), False, "needs glibc >= 2.35; this is glibc 2.31"),
    ({}, "madvise", None, False, "this is another C library"),
    ({"PHI_JAX_HUGE_PAGES_REEXECUTED": "1"}, "madvise", GLIBC, False, "did not reach this process"),
])
def test_plan(environ, mode, glibc, reexec, says):
    decision, message = host_memory.plan(environ, mode, glibc)
    assert decision == reexec
    assert says in message


def test_plan_leaves_accelerator_hosts_alone():
    decision, message = host_memory.plan({}, "madvise", GLIBC, accelerator="libtpu")
    assert not decision and "accelerator runtime libtpu installed" in message
    assert host_memory.accelerator_runtime({"JAX_PLATFORMS": "cpu"}) is None


PROBE = textwrap.dedent("""
    import ctypes, os, re
    from phi_jax.host_memory import ensure_huge_pages
    ensure_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 * 2**20
    ctypes.memset(libc.malloc(size), 1, size)  # one malloc and first touch, as XLA:CPU's step temporaries
    kib = int(re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read()).group(1))
    print(os.environ.get("GLIBC_TUNABLES", "-"), kib // 1024)
""")


@needs_thp
@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "opted-out"])
def test_reexecuted_process_allocates_on_huge_pages(tmp_path, opt_out):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = clean_env(**({"PHI_JAX_HUGE_PAGES": "0"} if opt_out else {}))
    env.pop("GLIBC_TUNABLES", None)
    if not opt_out:
        env.pop("PHI_JAX_HUGE_PAGES")
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    tunables, huge_mib = out[0], int(out[1])
    if opt_out:  # numpy madvises its own large arrays; a plain malloc gets 4 KiB pages
        assert tunables == "-" and huge_mib < 64, out
    else:
        assert tunables == "glibc.malloc.hugetlb=1" and huge_mib >= 200, out


def test_importing_phi_jax_never_restarts_the_process():
    """Only an entry point's `__main__` may re-execute; importing the package and its entry-point modules, even in a
    process whose arguments name an entry point, must not."""
    code = ("import os, sys\n"
            "def refuse(*args): raise AssertionError('import re-executed the process')\n"
            "os.execve = os.execv = refuse\n"
            "sys.orig_argv[:] = [sys.executable, '-m', 'phi_jax.train']\n"
            "import phi_jax, phi_jax.train, phi_jax.generate, phi_jax.evaluate\n"
            "assert phi_jax.PhiConfig is phi_jax.config.PhiConfig\n")
    env = clean_env()
    env.pop("PHI_JAX_HUGE_PAGES", None)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)


@needs_thp
def test_train_entry_point_runs_with_the_tunable(tmp_path):
    """`python -m phi_jax.train` as users run it: its log says the tunable reached the process."""
    env = clean_env()
    env.pop("GLIBC_TUNABLES", None)
    env.pop("PHI_JAX_HUGE_PAGES")
    r = subprocess.run(train_cmd(tmp_path / "run", "--config.data.path=/nonexistent/shards"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr[-2000:]
    assert "host memory: transparent huge pages: as GLIBC_TUNABLES sets them (glibc.malloc.hugetlb=1)" in r.stderr
