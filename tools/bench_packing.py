"""Builds the packing plan for many synthetic document lengths: seconds and peak memory (the issue's bar: 100M
documents in at most 60 s and 4 GB).

    python -m tools.bench_packing --docs=100000000 --out=bench_results/packing.json
"""

import argparse
import resource
import time

import numpy as np

from phi_jax.data.loader import pack_plan
from tools._bench import add_out_flag, command, machine, write_json


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def synthetic_lengths(n: int, seed: int, block: int = 1 << 22) -> np.ndarray:
    """Document lengths in tokens, lognormal (median ~670, mean ~1,100, a long tail), as the lengths file holds
    them (int64), generated a block at a time."""
    rng, out = np.random.default_rng(seed), np.empty(n, np.int64)
    for lo in range(0, n, block):
        k = min(block, n - lo)
        out[lo:lo + k] = np.clip(rng.lognormal(6.5, 1.0, k), 1, 200_000)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_flag(p, __file__)
    p.add_argument("--docs", type=int, default=100_000_000)
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    lengths = synthetic_lengths(a.docs, a.seed)
    before = peak_rss_gb()
    start = time.perf_counter()
    row_ptr, doc, _, length = pack_plan(lengths, a.seq_len)
    seconds = time.perf_counter() - start
    rows = len(row_ptr) - 1
    result = {"command": command(__file__, argv),
              "machine": machine(),
              "docs": a.docs, "seq_len": a.seq_len, "tokens": int(lengths.sum()), "rows": rows,
              "chunks": len(doc), "fill": round(float(length.sum()) / (rows * (a.seq_len + 1)), 4),
              "seconds": round(seconds, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
              "rss_before_plan_gb": round(before, 2)}
    write_json(a.out, result)
    print(f"{'docs':>12} {'rows':>12} {'fill':>6} {'seconds':>8} {'peak RSS GB':>12} {'(before plan)':>14}")
    print(f"{a.docs:>12,} {rows:>12,} {result['fill']:>6.3f} {seconds:>8.1f} {result['peak_rss_gb']:>12.2f} "
          f"{result['rss_before_plan_gb']:>14.2f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
