"""Throughput of the quality filter's embedding + classifier, and of deduplication and decontamination.

    python -m tools.bench_datagen [--docs=512] [--dedup_mb=20] [--workers=2] [--out=bench/datagen.json]

Embedding: the quickstart model's architecture (random weights: speed does not depend on them) and the quickstart
tokenizer, on the Python standard library's files cut to --max_tokens, --batch_size at a time, timed on a second
pass (the first compiles each length bucket); the random forest's predict_proba on those features. Dedup and
decontamination: the standard library's files (with 10% exact and 10% near copies added) as one JSONL source, each
stage alone through tools.dedup's datatrove pipelines with --workers processes, in MB of input per second, with
the peak resident memory of this process and of the largest worker.
"""

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from tools._bench import command, device, machine, print_table, write_json


def _stdlib_docs(limit_bytes: int | None = None, count: int | None = None) -> list[str]:
    from phi_jax.data.corpus import stdlib_documents

    docs, size = [], 0
    for text in stdlib_documents():
        docs.append(text)
        size += len(text.encode())
        if (limit_bytes and size >= limit_bytes) or (count and len(docs) >= count):
            break
    return docs


def bench_embedding(tmp: Path, docs: int, max_tokens: int, batch_size: int) -> list[dict]:
    import numpy as np

    from phi_jax.config import PhiConfig
    from phi_jax.data.default import ensure_default_dataset
    from phi_jax.datagen.classifier import make_classifier
    from phi_jax.datagen.embed import Embedder
    from phi_jax.hf.io import save_pretrained
    from phi_jax.model import count_params, init_model

    _, tokenizer = ensure_default_dataset()
    model = init_model(PhiConfig.preset("quickstart"), 0)
    params = count_params(model)
    save_pretrained(model, tmp / "quickstart", extra_files={"tokenizer.model": tokenizer.read_bytes()})
    texts = _stdlib_docs(count=docs)
    embedder = Embedder(str(tmp / "quickstart"), max_tokens=max_tokens, batch_size=batch_size)
    embedder.embed(texts)  # compiles every length bucket
    start = time.perf_counter()
    features = embedder.embed(texts)
    embed_s = time.perf_counter() - start
    labels = np.array(["class " in t for t in texts])
    clf = make_classifier("random_forest", 0, n_estimators=200).fit(features, labels)
    start = time.perf_counter()
    clf.predict_proba(features)
    predict_s = time.perf_counter() - start
    tokens = sum(min(len(embedder.tokenizer.encode(t)), max_tokens) for t in texts)
    return [{"step": "embed (quickstart model)", "params": params, "documents": len(texts), "tokens": tokens,
             "seconds": round(embed_s, 3), "documents_per_s": round(len(texts) / embed_s, 1),
             "tokens_per_s": round(tokens / embed_s)},
            {"step": "random forest predict_proba (200 trees)", "documents": len(texts),
             "seconds": round(predict_s, 3), "documents_per_s": round(len(texts) / predict_s, 1)},
            {"step": "embed + classify", "documents": len(texts), "seconds": round(embed_s + predict_s, 3),
             "documents_per_s": round(len(texts) / (embed_s + predict_s), 1)}]


def bench_dedup(tmp: Path, megabytes: float, workers: int) -> list[dict]:
    from phi_jax.datagen.decontaminate import humaneval_items
    from phi_jax.datagen.dedup import DedupSource, run

    rng = random.Random(0)
    docs = [d for d in _stdlib_docs(limit_bytes=int(megabytes * 2**20)) if d.count("\n") >= 2]
    extra = [rng.choice(docs) for _ in range(len(docs) // 10)]  # exact copies
    for text in rng.sample(docs, len(docs) // 10):  # near copies: one line changed
        lines = text.splitlines()
        lines[len(lines) // 2] = "# an edited line"
        extra.append("\n".join(lines))
    corpus = tmp / "corpus"
    corpus.mkdir()
    all_docs = docs + extra
    per_file = -(-len(all_docs) // (2 * workers))  # a few files per worker: datatrove splits by file
    size = 0
    for f in range(0, len(all_docs), per_file):
        part = all_docs[f:f + per_file]
        (corpus / f"{f:06d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
        size += sum(len(t.encode()) for t in part)
    source = [DedupSource.parse(f"code={corpus}")]
    rows = []
    for stage, kwargs in [("exact", {"near": False}), ("near (MinHash)", {"exact": False}),
                          ("decontaminate (HumanEval, 13-grams)", {"exact": False, "near": False,
                                                                    "benchmark_items": humaneval_items()})]:
        start = time.perf_counter()
        report = run(source, tmp / f"out-{len(rows)}", tasks=workers * 2, workers=workers, **kwargs)
        seconds = time.perf_counter() - start
        total = report["total"]
        rows.append({"step": stage, "documents": total["input"], "megabytes": round(size / 2**20, 2),
                     "dropped": total["input"] - total["kept"], "seconds": round(seconds, 2),
                     "megabytes_per_s": round(size / 2**20 / seconds, 2),
                     "peak_rss_mb_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                     "peak_rss_mb_largest_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=512, help="documents embedded")
    p.add_argument("--max_tokens", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--dedup_mb", type=float, default=20.0, help="MB of stdlib source for the dedup stages")
    p.add_argument("--workers", type=int, default=2, help="datatrove worker processes")
    p.add_argument("--skip", choices=["embedding", "dedup"], action="append", default=[])
    p.add_argument("--out", default="bench/datagen.json")
    a = p.parse_args(argv)
    result = {"command": command(__file__, argv), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        if "dedup" not in a.skip:  # first: its workers are forked, before JAX starts its threads
            result["dedup"] = bench_dedup(Path(tmp), a.dedup_mb, a.workers)
            print_table(f"dedup and decontamination, {a.workers} workers", result["dedup"])
        if "embedding" not in a.skip:
            result["embedding"] = bench_embedding(Path(tmp), a.docs, a.max_tokens, a.batch_size)
            print_table(f"quality filter, max_tokens {a.max_tokens}, batch {a.batch_size}", result["embedding"])
    result["device"] = device()
    write_json(a.out, result)
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
