"""Filtering a corpus with the quality classifier, at any scale (phi-1 section 2.1; phi-1.5-web's 95B tokens).

The corpus (JSONL files, in order) is cut into chunks of `chunk_docs` documents; chunk c belongs to task
c % num_tasks, and is a pure function of its documents, so any number of tasks writes the same bytes, and a killed
task resumes at its first unfinished chunk. Per chunk:
    kept/chunk-CCCCC.jsonl     the documents scoring >= threshold, each its original record plus "quality_score"
    scores/chunk-CCCCC.npy     every document's score (the chunk's done marker, written last)
When every chunk is done, the task that finishes last (or `--report_only`) writes report.json (documents, kept,
keep rate, histogram) and scores.png. Then: python -m tools.prepare_data --source=jsonl --jsonl='OUT/kept/*.jsonl'.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from phi_jax.datagen.classifier import load_classifier
from phi_jax.datagen.documents import expand, read_documents
from phi_jax.datagen.journal import write_json
from phi_jax.datagen.synthesize import check_plan

log = logging.getLogger("phi_jax")
BINS = 20


def _chunks(corpus, chunk_docs: int, text_field: str, id_field: str) -> Iterator[list[tuple[str, str, dict]]]:
    chunk = []
    for doc in read_documents(corpus, text_field, id_field):
        chunk.append(doc)
        if len(chunk) == chunk_docs:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def filter_corpus(corpus, out: str | Path, classifier_dir: str | Path, *, threshold: float = 0.5,
                  chunk_docs: int = 1024, num_tasks: int = 1, task_index: int = 0, text_field: str = "text",
                  id_field: str = "id", embedder=None, make_embedder=None) -> dict:
    """Scores and filters this task's chunks; `make_embedder(settings)` builds the embedder the classifier was
    trained with (or pass `embedder`). Returns the task's summary, with the report once every chunk is done."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold={threshold} must be in [0, 1] (a probability of high quality).")
    if chunk_docs < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"--chunk_docs={chunk_docs} must be >= 1 and --task_index={task_index} in "
                         f"[0, --num_tasks={num_tasks}).")
    out = Path(out)
    clf, info = load_classifier(classifier_dir)
    files = expand(corpus)
    check_plan(out, {"kind": "quality_filter", "corpus": [[str(p), p.stat().st_size] for p in files],
                     "chunk_docs": chunk_docs, "threshold": threshold, "classifier": info})
    (out / "kept").mkdir(exist_ok=True)
    (out / "scores").mkdir(exist_ok=True)
    start, docs_done, kept_done, chunks_total = time.monotonic(), 0, 0, 0
    for c, chunk in enumerate(_chunks(files, chunk_docs, text_field, id_field)):
        chunks_total += 1
        scores_path = out / "scores" / f"chunk-{c:05d}.npy"
        if c % num_tasks != task_index or scores_path.exists():
            continue
        if embedder is None:
            embedder = make_embedder(info["embedder"])
            recorded = {k: v for k, v in info["embedder"].items() if k != "model"}
            if (now := {k: v for k, v in embedder.describe().items() if k != "model"}) != recorded:
                raise ValueError(f"The embedder's settings {now} differ from those the classifier was trained on "
                                 f"{recorded}: features must be made the same way.")
        scores = clf.predict_proba(embedder.embed([t for _, t, _ in chunk]))[:, 1].astype(np.float32)
        kept = [json.dumps({**r, "quality_score": round(float(s), 6)}, ensure_ascii=False) + "\n"
                for (_, _, r), s in zip(chunk, scores, strict=True) if s >= threshold]
        _atomic_write(out / "kept" / f"chunk-{c:05d}.jsonl", "".join(kept).encode("utf-8"))
        tmp = scores_path.with_name(f".{scores_path.name}.tmp.npy")
        np.save(tmp, scores)
        os.replace(tmp, scores_path)
        docs_done, kept_done = docs_done + len(chunk), kept_done + len(kept)
        log.info("quality filter: chunk %d: %d of %d documents kept", c, len(kept), len(chunk))
    summary = {"task": task_index, "num_tasks": num_tasks, "chunks": chunks_total, "scored_now": docs_done,
               "kept_now": kept_done, "seconds": round(time.monotonic() - start, 3)}
    if all((out / "scores" / f"chunk-{c:05d}.npy").exists() for c in range(chunks_total)):
        summary["report"] = write_report(out, threshold, chunks_total)
    else:
        summary["report"] = None
    return summary


def write_report(out: str | Path, threshold: float, chunks: int | None = None) -> dict:
    """report.json and scores.png (a histogram of every document's score, the threshold marked)."""
    out = Path(out)
    paths = sorted((out / "scores").glob("chunk-*.npy"))
    if chunks is not None and len(paths) != chunks:
        raise ValueError(f"{out} has {len(paths)} of {chunks} chunks scored: run the remaining tasks first.")
    scores = np.concatenate([np.load(p) for p in paths]) if paths else np.zeros(0, np.float32)
    counts, edges = np.histogram(scores, bins=BINS, range=(0.0, 1.0))
    kept = int((scores >= threshold).sum())
    report = {"documents": int(scores.size), "kept": kept, "keep_rate": kept / max(scores.size, 1),
              "threshold": threshold, "histogram": {"edges": [round(float(e), 4) for e in edges],
                                                    "counts": counts.tolist()}}
    write_json(out / "report.json", report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=edges, color="#4c72b0")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
    ax.set(xlabel="classifier score (probability of high educational value)", ylabel="documents",
           title=f"{scores.size} documents, {kept} kept ({100 * report['keep_rate']:.1f}%)")
    ax.legend()
    fig.tight_layout()
    tmp = out / ".scores.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out / "scores.png")
    return report
