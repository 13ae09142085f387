"""Host memory for XLA:CPU: glibc's malloc on transparent huge pages.

XLA:CPU allocates the temporaries of each run of an executable (gigabytes for a training step) in one malloc,
which glibc serves from a fresh mmap and returns with munmap. Every step then page-faults its working set back in,
4 KiB at a time, and runs its matmuls on 4 KiB pages. glibc's tunable `glibc.malloc.hugetlb=1` makes malloc
madvise its memory for transparent huge pages (what that saves per step is measured in docs/PERFORMANCE.md,
"Host memory: XLA:CPU's temporaries on transparent huge pages"). glibc reads tunables only when a process starts, so
phi_jax's command-line entry points call `ensure_huge_pages()` first thing, which re-executes the process once with
the tunable added. It applies to CPU hosts only: where an accelerator runtime is installed (and JAX_PLATFORMS does
not pin the CPU), the host's malloc is left alone. `PHI_JAX_HUGE_PAGES=0` leaves it alone everywhere.
Importing phi_jax never does any of this.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "PHI_JAX_HUGE_PAGES"  # "0": never re-execute
_REEXECUTED = "PHI_JAX_HUGE_PAGES_REEXECUTED"  # set in the re-executed process: never twice
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# Installed JAX accelerator runtimes (module names); their hosts keep step temporaries in device memory.
ACCELERATOR_RUNTIMES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin")


def thp_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'); None where it has none."""
    try:
        with open(path) as f:
            m = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None under another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    return tuple(int(x) for x in version.split(".")[:2]) if name == "glibc" else None


def accelerator_runtime(environ: Mapping[str, str]) -> str | None:
    """The installed accelerator runtime JAX may use, unless JAX_PLATFORMS pins the CPU; None on a CPU host."""
    if environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    return next((m for m in ACCELERATOR_RUNTIMES if importlib.util.find_spec(m) is not None), None)


def plan(environ: Mapping[str, str], mode: str | None, glibc: tuple[int, int] | None,
         accelerator: str | None = None) -> tuple[bool, str]:
    """(whether to re-execute with the tunable, what to log about host memory)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT) == "0":
        return False, f"malloc left as it is ({OPT_OUT}=0)"
    if accelerator:
        return False, (f"malloc left as it is (accelerator runtime {accelerator} installed; huge pages are for "
                       "XLA:CPU, set JAX_PLATFORMS=cpu to train on the CPU with them)")
    if mode == "always":
        return False, "transparent huge pages: on (the kernel's mode is 'always')"
    if mode != "madvise":
        return False, (f"transparent huge pages: off (the kernel's mode is {mode or 'absent'}); XLA:CPU's steps "
                       "re-fault their temporaries on 4 KiB pages. Enable 'madvise' in " + THP_SETTING)
    if f"{TUNABLE}=" in tunables:
        return False, f"transparent huge pages: as GLIBC_TUNABLES sets them ({tunables})"
    if glibc is None or glibc < (2, 35):
        found = f"glibc {glibc[0]}.{glibc[1]}" if glibc else "another C library"
        return False, f"transparent huge pages: off ({TUNABLE} needs glibc >= 2.35; this is {found})"
    if environ.get(_REEXECUTED):
        return False, "transparent huge pages: off (re-executed with the tunable, but it did not reach this process)"
    return True, f"re-executing with GLIBC_TUNABLES={TUNABLE}=1"


def _plan_here() -> tuple[bool, str]:
    return plan(os.environ, thp_mode(), glibc_version(), accelerator_runtime(os.environ))


def status() -> str:
    """What to log about host memory in this process."""
    return _plan_here()[1]


def ensure_huge_pages() -> None:
    """Re-executes this process (same interpreter, same arguments) with glibc's malloc on transparent huge pages,
    where that applies; otherwise returns. Call it first thing in a command-line entry point, before JAX starts
    (phi_jax.cli.run does, for every entry point)."""
    if not _plan_here()[0]:
        return
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), f"{TUNABLE}=1") if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables, _REEXECUTED: "1"})

