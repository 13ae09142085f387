"""Timing shared by the kernel benchmarks."""

import statistics
import time

import jax


def median_seconds(fn, *args, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds per call of `fn(*args)` over `iters` calls, after `warmup` calls (the first compiles); each
    call is ended by block_until_ready, so asynchronous dispatch is not mistaken for speed."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
