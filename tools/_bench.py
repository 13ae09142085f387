"""What the benchmarks share: timing, the record of the command and machine, result tables and files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def median_seconds(fn, *args, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of `fn(*args)` over `iters` calls, after `warmup` calls (the first compiles); each
    call is ended by block_until_ready, so asynchronous dispatch is not mistaken for speed."""
    import jax  # here, not at the top: tools such as plan_memory configure JAX before importing it

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(f):
    """jit of (*args, ct) -> (f(*args), grads of <f(*args), ct> in args): one forward and one backward pass."""
    import jax

    def run(*args):
        out, vjp = jax.vjp(f, *args[:-1])
        return out, vjp(args[-1])

    return jax.jit(run)


def command(tool_file: str, argv: list[str] | None = None) -> str:
    """The command line of a tool run as `python -m tools.NAME` (`tool_file`: its __file__)."""
    return " ".join(["python", "-m", f"tools.{Path(tool_file).stem}", *(sys.argv[1:] if argv is None else argv)])


def machine() -> dict:
    """The host a figure was measured on (the load average: whether other work shared it)."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0]}


def device() -> dict:
    """The JAX backend, its first device's kind and count, and the jax version."""
    import jax

    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "device_count": len(jax.devices()), "jax": jax.__version__}


def print_table(title: str, rows: list[dict]) -> None:
    """Rows as aligned columns (the union of their keys, in first-seen order)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"\n== {title} ==")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def write_json(path: str, result: dict) -> None:
    """Writes `result` to `path` through a temporary file and a rename: never a half-written results file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
