"""Preparation throughput: tokens/s of tools/prepare_data.py's engine at several --workers, and per core.

    python tools/bench_prepare.py --workers=1,2 --out=bench_results/prepare.json

The documents (the Python standard library's sources, ~31 MB) are read into memory first, so the figure is
tokenizing + writing shards; the spawn of the worker processes is included.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from _timing import write_json

from phi_jax.data.corpus import stdlib_documents
from phi_jax.data.default import ensure_default_dataset
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--docs_per_shard", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    p.add_argument("--cache_dir", default=None)
    a = p.parse_args(argv)
    _, tok_path = ensure_default_dataset(a.cache_dir)  # the stdlib corpus's own SentencePiece model (vocab 8192)
    tok = load_tokenizer(tok_path)
    docs = list(stdlib_documents())
    rows = []
    for workers in map(int, a.workers.split(",")):
        best = None
        for _ in range(a.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                meta = prepare_shards(docs, tok, Path(tmp) / "d", docs_per_shard=a.docs_per_shard, workers=workers)
                seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        rows.append({"workers": workers, "documents": len(docs), "tokens": tokens, "seconds": round(best, 2),
                     "tokens_per_sec": round(tokens / best),
                     "tokens_per_sec_per_worker": round(tokens / best / workers)})
    result = {"command": " ".join([sys.executable, *sys.argv]),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "load_average_1min": os.getloadavg()[0]},
              "docs_per_shard": a.docs_per_shard, "results": rows}
    write_json(a.out, result)
    print(f"{'workers':>8} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'per worker':>12}")
    for r in rows:
        print(f"{r['workers']:>8} {r['tokens']:>12,} {r['seconds']:>8.2f} {r['tokens_per_sec']:>12,} "
              f"{r['tokens_per_sec_per_worker']:>12,}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
