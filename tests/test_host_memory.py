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


@pytest.mark.parametrize("argv,expected", [
    (["python", "-m", "phi_jax.train", "--config=configs/phi15.py"], True),
    (["python", "-mphi_jax.generate", "--model=x"], True),
    (["python", "-X", "dev", "-W", "error", "-m", "phi_jax.evaluate"], True),
    (["python", "-m", "pytest", "-m", "phi_jax.train"], False),
    (["python", "tools/bench_train.py", "-m", "phi_jax.train"], False),
    (["python", "-c", "import phi_jax", "-m", "phi_jax.train"], False),
    (["python"], False),
])
def test_launched_as_entry_point(argv, expected):
    assert host_memory.launched_as_entry_point(argv) == expected


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
    out = subprocess.run([sys.executable, str(script)], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    tunables, huge_mib = out[0], int(out[1])
    if opt_out:  # numpy madvises its own large arrays; a plain malloc gets 4 KiB pages
        assert tunables == "-" and huge_mib < 64, out
    else:
        assert tunables == "glibc.malloc.hugetlb=1" and huge_mib >= 200, out


def test_importing_phi_jax_does_not_import_jax():
    """The entry points restart themselves from phi_jax/__init__.py; that must come before JAX's import cost."""
    code = "import sys, phi_jax; assert 'jax' not in sys.modules; phi_jax.PhiConfig; assert 'jax' in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), check=True)


@needs_thp
def test_train_entry_point_runs_with_the_tunable(tmp_path):
    """`python -m phi_jax.train` as users run it: its log says the tunable reached the process."""
    env = clean_env()
    env.pop("GLIBC_TUNABLES", None)
    r = subprocess.run(train_cmd(tmp_path / "run", "--config.data.path=/nonexistent/shards"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr[-2000:]
    assert "host memory: transparent huge pages: as GLIBC_TUNABLES sets them (glibc.malloc.hugetlb=1)" in r.stderr
