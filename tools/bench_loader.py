"""Measures the input pipeline's throughput (tokens/s) on the embedded stdlib corpus.

    python -m tools.bench_loader --out=bench_results/loader.json
    python -m tools.bench_loader --phi15 --out=bench_results/loader_phi15.json

--phi15: phi-1.5's shapes (global batch 2048 x 2048, packed, an 80/20 mixture of two shard directories), loaded by
one process that takes its 1/P share of each global batch as on a P-host job, against what 64 accelerators at 45k
tokens/s each consume (2.88M tokens/s in all, 2.88M/P per host).
"""

import argparse
import time

from phi_jax.data.corpus import stdlib_documents
from phi_jax.data.default import ensure_default_dataset
from phi_jax.data.loader import make_dataset, make_mixture_dataset
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.tokenizer import load_tokenizer
from tools._bench import add_out_flag, command, machine, write_json

DEVICES, DEVICE_TOKENS_PER_SEC = 64, 45_000


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


def bench_phi15(data_dir, tok_path, hosts: list[int], global_batches: int, warmup: int) -> list[dict]:
    """Per-host loader throughput at phi-1.5's shapes on a mixture, against the 64-accelerator consumption.

    Each setting loads the same tokens (`global_batches` global batches' worth, i.e. global_batches x P of its own
    batches) after `warmup` batches that also fill grain's prefetch buffer."""
    import tempfile
    from pathlib import Path

    seq_len, global_batch = 2048, 2048
    with tempfile.TemporaryDirectory() as tmp:
        second = Path(tmp) / "second"  # a second source with the same tokenizer: every other stdlib file
        prepare_shards(list(stdlib_documents())[::2], load_tokenizer(tok_path), second, docs_per_shard=200)
        rows = []
        for p in hosts:
            ds = make_mixture_dataset([data_dir, second], [0.8, 0.2], seq_len=seq_len, global_batch_size=global_batch,
                                      seed=0, process_index=0, process_count=p, packing=True)
            it = iter(ds)
            for _ in range(warmup):
                next(it)
            batches = global_batches * p
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            seconds = time.perf_counter() - start
            tokens_per_sec = batches * global_batch // p * seq_len / seconds
            need = DEVICES * DEVICE_TOKENS_PER_SEC / p
            rows.append({"hosts": p, "rows_per_host": global_batch // p, "batches": batches,
                         "seconds": round(seconds, 2), "tokens_per_sec": round(tokens_per_sec),
                         "needed_tokens_per_sec": round(need), "headroom": round(tokens_per_sec / need, 2)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_flag(p, __file__)
    p.add_argument("--seq_len", default="256,2048", help="comma-separated")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=200, help="batches timed (--phi15: global batches' worth)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--phi15", action="store_true", help="phi-1.5's shapes on a mixture, per host (see above)")
    p.add_argument("--hosts", default="1,8,16", help="--phi15: hosts sharing each global batch")
    a = p.parse_args(argv)
    start = time.perf_counter()
    data_dir, tok_path = ensure_default_dataset(a.cache_dir, a.vocab_size)
    ready = time.perf_counter() - start
    host = machine()
    if a.phi15:
        rows = bench_phi15(data_dir, tok_path, [int(h) for h in a.hosts.split(",")], a.steps, a.warmup)
        write_json(a.out, {"command": command(__file__, argv), "machine": host,
                           "devices": DEVICES, "device_tokens_per_sec": DEVICE_TOKENS_PER_SEC, "results": rows})
        print(f"{'hosts':>6} {'rows/host':>10} {'tokens/s/host':>14} {'needed/host':>12} {'headroom':>9}")
        for r in rows:
            print(f"{r['hosts']:>6} {r['rows_per_host']:>10} {r['tokens_per_sec']:>14,} "
                  f"{r['needed_tokens_per_sec']:>12,} {r['headroom']:>8.2f}x")
        print(f"wrote {a.out}")
        return
    rows = [bench(data_dir, int(s), a.batch, packing, a.steps, a.warmup)
            for s in a.seq_len.split(",") for packing in (False, True)]
    result = {"command": command(__file__, argv), "data_dir": str(data_dir),
              "dataset_ready_seconds": round(ready, 2), "machine": host, "results": rows}
    write_json(a.out, result)
    print(f"{'seq_len':>8} {'batch':>6} {'packing':>8} {'tokens/s':>12} {'ms/batch':>9}")
    for r in rows:
        print(f"{r['seq_len']:>8} {r['batch']:>6} {r['packing']!s:>8} {r['tokens_per_sec']:>12,} "
              f"{r['ms_per_batch']:>9.2f}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
