"""Exact and near-duplicate removal within and across sources, and n-gram decontamination (datatrove pipelines).

    python -m tools.dedup --source=textbooks=data/textbooks/part-*.jsonl --source=web=web_filtered/kept \\
        --humaneval --benchmark=mbpp=mbpp.jsonl --out=data/clean --tasks=8 --workers=2
    python -m tools.prepare_data --source=jsonl --jsonl='data/clean/output/web/*.jsonl' --tokenizer=TOK --out=DATA/web

Among identical documents the one from the source given first is kept. A killed run resumes with the same command
(finished datatrove ranks are skipped). report.json counts what each stage dropped from each source;
dropped.jsonl says why for every document (the copy that was kept, or the benchmark and the shared n-gram).
Sources are JSONL: a file, a directory (its *.jsonl) or DIR/PATTERN.
"""

import argparse
import json

from phi_jax.datagen.decontaminate import humaneval_items, jsonl_items


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", action="append", required=True, help="NAME=PATH (repeatable; first = kept first)")
    p.add_argument("--out", required=True)
    p.add_argument("--text_field", default="text")
    p.add_argument("--id_field", default="id")
    p.add_argument("--no_exact", action="store_true", help="skip exact deduplication")
    p.add_argument("--no_near", action="store_true", help="skip MinHash near-duplicate removal")
    p.add_argument("--minhash_ngram", type=int, default=5, help="words per MinHash shingle")
    p.add_argument("--minhash_buckets", type=int, default=14, help="LSH bands")
    p.add_argument("--minhash_hashes_per_bucket", type=int, default=8, help="hashes per band")
    p.add_argument("--humaneval", action="store_true", help="decontaminate against HumanEval (prompts, solutions)")
    p.add_argument("--benchmark", action="append", default=[],
                   help="NAME=FILE.jsonl of benchmark items to decontaminate against (repeatable)")
    p.add_argument("--benchmark_query_field", default="prompt", help="the benchmark items' prompt field (optional)")
    p.add_argument("--benchmark_answer_field", default="solution", help="the benchmark items' answer field")
    p.add_argument("--ngram", type=int, default=13, help="decontamination n-gram length, in words")
    p.add_argument("--tasks", type=int, default=1, help="datatrove ranks (input files are split among them)")
    p.add_argument("--workers", type=int, default=1, help="processes running ranks at once")
    a = p.parse_args(argv)

    from datatrove.pipeline.dedup.minhash import MinhashConfig

    from phi_jax.datagen.dedup import DedupSource, run

    sources = [DedupSource.parse(s) for s in a.source]
    benchmarks = []
    for spec in a.benchmark:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--benchmark={spec} must be NAME=FILE.jsonl")
        benchmarks.append((name, path))
    items = None
    if a.humaneval or benchmarks:
        items = [*(humaneval_items() if a.humaneval else []),
                 *(item for name, path in benchmarks
                   for item in jsonl_items(name, path, a.benchmark_query_field, a.benchmark_answer_field))]
    if a.no_exact and a.no_near and items is None:
        p.error("nothing to do: --no_exact and --no_near with no --humaneval or --benchmark")
    minhash = MinhashConfig(n_grams=a.minhash_ngram, num_buckets=a.minhash_buckets,
                            hashes_per_bucket=a.minhash_hashes_per_bucket)
    report = run(sources, a.out, exact=not a.no_exact, near=not a.no_near, benchmark_items=items, tasks=a.tasks,
                 workers=a.workers, text_field=a.text_field, id_field=a.id_field, minhash=minhash, n_grams=a.ngram)
    print(f"{'source':<16} {'input':>9} {'exact':>9} {'near':>9} {'contam.':>9} {'kept':>9}")
    for name, r in [*report["sources"].items(), ("total", report["total"])]:
        print(f"{name:<16} {r['input']:>9} {r['dropped_exact']:>9} {r['dropped_near']:>9} "
              f"{r['dropped_contaminated']:>9} {r['kept']:>9}")
    if report["benchmarks"]:
        print("benchmark index: " + json.dumps(report["benchmarks"]))
    for name, folder in report["output"].items():
        print(f"kept {name}: {folder}/*.jsonl")
    print(f"why each document was dropped: {report['dropped_list']}")


if __name__ == "__main__":
    from phi_jax.cli import run

    run(main)
