"""Measures the input pipeline's throughput (tokens/s) on the embedded stdlib corpus.

    python tools/bench_loader.py --out=bench_results/loader.json
"""

import argparse
import os
import platform
import sys
import time

from _timing import write_json

from phi_jax.data.default import ensure_default_dataset
from phi_jax.data.loader import make_dataset


def bench(data_dir, seq_len: int, batch: int, packing: bool, steps: int, warmup: int) -> dict:
    it = iter(make_dataset(data_dir, seq_len=seq_len, global_batch_size=batch, seed=0, packing=packing))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    seconds = time.perf_counter() - start
    return {"seq_len": seq_len, "batch": batch, "packing": packing, "steps": steps, "seconds": round(seconds, 4),
            "tokens_per_sec": round(steps * batch * seq_len / seconds), "ms_per_batch": round(1e3 * seconds / steps, 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--seq_lens", default="256,2048")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--vocab_size", type=int, default=8192)
    a = p.parse_args(argv)
    start = time.perf_counter()
    data_dir, _ = ensure_default_dataset(a.cache_dir, a.vocab_size)
    ready = time.perf_counter() - start
    rows = [bench(data_dir, int(s), a.batch, packing, a.steps, a.warmup)
            for s in a.seq_lens.split(",") for packing in (False, True)]
    result = {"command": " ".join([sys.executable, *sys.argv]), "data_dir": str(data_dir),
              "dataset_ready_seconds": round(ready, 2),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
              "results": rows}
    write_json(a.out, result)
    print(f"{'seq_len':>8} {'batch':>6} {'packing':>8} {'tokens/s':>12} {'ms/batch':>9}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['batch']:>6} {r['packing']!s:>8} {r['tokens_per_sec']:>12,} "
              f"{r['ms_per_batch']:>9.2f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
