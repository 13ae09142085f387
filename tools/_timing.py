"""Timing and result files shared by the benchmarks."""

import json
import os
import statistics
import time


def median_seconds(fn, *args, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of `fn(*args)` over `iters` calls, after `warmup` calls (the first compiles); each
    call is ended by block_until_ready, so asynchronous dispatch is not mistaken for speed."""
    import jax  # here, not at the top: tools such as plan_memory.py configure JAX before importing it

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_json(path: str, result: dict) -> None:
    """Writes `result` to `path` through a temporary file and a rename: never a half-written results file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
