"""Preparation throughput: tokens/s of tools/prepare_data.py's engine at several --workers, and per core.

    python -m tools.bench_prepare --workers=1,2 --out=bench_results/prepare.json
    python -m tools.bench_prepare --workers=1 --copies=3 --repeats=1 --out=bench_results/prepare_x3.json

The documents (the Python standard library's sources, ~31 MB) are read into memory first, so the figure is
tokenizing + writing shards; the spawn of the worker processes is included. --copies streams the corpus that many
times over (a corpus N times larger); the peak memory of this process and of its workers shows whether memory
grows with the corpus. CPU seconds (this process and its workers) give tokens per CPU-second: the per-core rate,
which a machine shared with other work does not distort the way it distorts wall-clock tokens/s.
"""

import argparse
import itertools
import resource
import tempfile
import time
from pathlib import Path

from phi_jax.data.corpus import stdlib_documents
from phi_jax.data.default import ensure_default_dataset
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer
from tools._bench import add_out_flag, command, machine, write_json


def cpu_seconds() -> tuple[float, float]:
    """(this process, its finished children): user + system CPU seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_flag(p, __file__)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--docs_per_shard", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2, help="runs per setting; the best is reported")
    p.add_argument("--copies", type=int, default=1, help="stream the corpus this many times over")
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
                start, cpu = time.perf_counter(), cpu_seconds()
                stream = itertools.chain.from_iterable(itertools.repeat(docs, a.copies))
                meta = prepare_shards(stream, tok, Path(tmp) / "d", docs_per_shard=a.docs_per_shard,
                                      workers=workers)
                seconds = time.perf_counter() - start
                cpu_main, cpu_workers = (b - a for a, b in zip(cpu, cpu_seconds(), strict=True))
            if best is None or seconds < best:
                best, best_cpu = seconds, (cpu_main, cpu_workers)
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        rows.append({"workers": workers, "documents": len(docs), "tokens": tokens, "seconds": round(best, 2),
                     "tokens_per_sec": round(tokens / best),
                     "tokens_per_sec_per_worker": round(tokens / best / workers),
                     "cpu_seconds_main": round(best_cpu[0], 2), "cpu_seconds_workers": round(best_cpu[1], 2),
                     "tokens_per_cpu_second": round(tokens / sum(best_cpu)),
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                     "workers_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)})
    result = {"command": command(__file__, argv),
              "machine": machine(),
              "docs_per_shard": a.docs_per_shard, "copies": a.copies, "results": rows}
    write_json(a.out, result)
    print(f"{'workers':>8} {'tokens':>12} {'seconds':>8} {'tokens/s':>12} {'per worker':>12} {'per CPU-s':>10} "
          f"{'main CPU-s':>10} {'peak MB':>8}")
    for r in rows:
        print(f"{r['workers']:>8} {r['tokens']:>12,} {r['seconds']:>8.2f} {r['tokens_per_sec']:>12,} "
              f"{r['tokens_per_sec_per_worker']:>12,} {r['tokens_per_cpu_second']:>10,} {r['cpu_seconds_main']:>10} "
              f"{r['peak_rss_mb']:>8,}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
