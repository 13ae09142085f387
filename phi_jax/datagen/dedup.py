"""Exact and near-duplicate removal within and across sources, then decontamination, as datatrove pipelines.

Stages, each a datatrove pipeline run by its LocalPipelineExecutor (`tasks` ranks, `workers` processes; a rank
that finished is skipped when the command is run again, so a killed run resumes; workers are forked, so they
inherit this process's imports rather than import phi_jax and JAX again, seconds each, and none of them uses JAX):
1. exact: ExactDedupSignature -> ExactFindDedups -> ExactDedupFilter on the exact text. Of identical documents the
   one from the source given first is kept (datatrove's document priority), so duplicates of a curated source
   are dropped from the web rather than the other way round.
2. near: MinhashDedupSignature -> Buckets -> Cluster -> Filter (MinHash LSH over word 5-grams; 14 bands of 8
   hashes: pairs above about 0.72 Jaccard similarity are found with high probability). One document per cluster
   is kept (datatrove keeps a cluster's root, whatever its source).
3. decontaminate: datatrove's NGramsDecontFilter against an index of HumanEval and any JSONL benchmark
   (decontaminate.py).
All sources are read by one chain of readers, so duplicates are found across sources as well as within them.

Output directory:
    output/SOURCE/RANK.jsonl  the documents kept, each its input record's fields (id, text, ...); prepare each
                          source's directory on its own to mix them with weights
    removed/STAGE/        the documents each stage dropped (datatrove's exclusion writers)
    report.json           documents in, dropped by stage and source, kept; dropped.jsonl: each dropped document's
                          id, source, stage and why (the kept copy's id, the cluster, the benchmark and n-gram)
    work/, logs/          datatrove's intermediate files and per-stage logs and stats
The stages could also be handed to datatrove's SlurmPipelineExecutor for a cluster (`pipelines` builds them); the
local executor is the one exercised here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.decont.n_grams import NGramsDecontFilter
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from phi_jax.datagen.decontaminate import WhitespaceWordTokenizer, build_index, decont_config
from phi_jax.datagen.journal import write_json

STAGES = ("exact", "near", "contaminated")
# metadata of datatrove and of this module, left out of the output
INTERNAL = ("file_path", "duplicate_count", "minhash_cluster_id", "dedup_source", "dedup_priority")


@dataclasses.dataclass(frozen=True)
class DedupSource:
    """A named JSONL source: a file, or a directory (with a glob pattern relative to it, default *.jsonl)."""

    name: str
    path: str
    glob: str | None = None

    @classmethod
    def parse(cls, spec: str) -> DedupSource:
        """NAME=PATH (a file, a directory, or a directory/PATTERN such as web/*.jsonl)."""
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--source={spec} must be NAME=PATH, e.g. --source=web=data/web/*.jsonl.")
        p = Path(path).expanduser()
        if p.is_file():
            return cls(name, str(p.parent), p.name)
        if p.is_dir():
            return cls(name, str(p), "*.jsonl")
        if any(c in p.name for c in "*?["):
            if not p.parent.is_dir():
                raise FileNotFoundError(f"--source={spec}: {p.parent} is not a directory.")
            return cls(name, str(p.parent), p.name)
        raise FileNotFoundError(f"--source={spec}: {p} does not exist.")


def exact_text(doc: Document) -> str:
    return doc.text


def _priority(doc: Document) -> int:
    return doc.metadata["dedup_priority"]


def _readers(sources: list[DedupSource], text_field: str, id_field: str) -> list[JsonlReader]:
    """One reader per source; an earlier source gets a higher priority (kept first among exact duplicates)."""
    return [JsonlReader(s.path, glob_pattern=s.glob, text_key=text_field, id_key=id_field, compression=None,
                        default_metadata={"dedup_source": s.name, "dedup_priority": len(sources) - i})
            for i, s in enumerate(sources)]


def _stage_reader(folder: Path) -> list[JsonlReader]:
    return [JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None)]


def _kept_record(self, doc: Document) -> dict:  # a DiskWriter adapter: the input record's fields, flat
    return {"id": doc.id, "text": doc.text, **{k: v for k, v in doc.metadata.items() if k not in INTERNAL}}


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _kept_index(self, doc: Document) -> dict:  # what the report needs of each kept document
    return {"id": doc.id, "dedup_source": doc.metadata["dedup_source"], "sha256": _text_sha256(doc.text),
            "minhash_cluster_id": doc.metadata.get("minhash_cluster_id", -1)}


def _id_only(self, doc: Document) -> dict:  # line i of a rank's file: the id of the rank's document i
    return {"id": doc.id}


def _writer(folder: Path, final: bool = False) -> JsonlWriter:
    """An intermediate stage's writer (the metadata flat, read back by the next stage), or the final one: one
    directory per source, the input records as they were."""
    return JsonlWriter(str(folder), compression=None, adapter=_kept_record if final else None,
                       output_filename="${dedup_source}/${rank}.jsonl" if final else None, expand_metadata=not final)


def _final_writers(out: Path) -> list[JsonlWriter]:
    return [_writer(out / "output", True),
            JsonlWriter(str(out / "work" / "kept_index"), compression=None, adapter=_kept_index)]


def pipelines(sources: list[DedupSource], out: Path, *, exact: bool = True, near: bool = True,
              decontaminate: bool = True, text_field: str = "text", id_field: str = "id",
              minhash: MinhashConfig | None = None, n_grams: int = 13) -> list[tuple[str, list, int | None]]:
    """(name, pipeline steps, tasks or None = the run's) of every datatrove stage, in order."""
    work, removed = out / "work", out / "removed"
    minhash = minhash or MinhashConfig()
    words = WhitespaceWordTokenizer()
    steps: list[tuple[str, list, int | None]] = []
    read = _readers(sources, text_field, id_field)
    enabled = [s for s, on in zip(STAGES, (exact, near, decontaminate), strict=True) if on]
    if not enabled:
        raise ValueError("Nothing to do: exact, near and decontaminate are all off.")
    last = enabled[-1]
    if exact:
        cfg = ExactDedupConfig(content_getter=exact_text, document_priority=_priority)
        steps += [("exact-1-signatures", [*read, ExactDedupSignature(str(work / "exact_sigs"), cfg)], None),
                  ("exact-2-find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), cfg)], 1),
                  ("exact-3-filter", [*read, ExactDedupFilter(str(work / "exact_dups"), cfg,
                                                              exclusion_writer=_writer(removed / "exact")),
                                      *(_final_writers(out) if last == "exact" else [_writer(work / "after_exact")])],
                   None)]
        read = _stage_reader(work / "after_exact")
    if near:
        sig, buckets, clusters = work / "minhash_sigs", work / "minhash_buckets", work / "minhash_clusters"
        ids = JsonlWriter(str(work / "minhash_ids"), compression=None, adapter=_id_only)  # to name cluster members
        steps += [("near-1-signatures", [*read, ids, MinhashDedupSignature(str(sig), config=minhash, language=words)],
                   None),
                  ("near-2-buckets", [MinhashDedupBuckets(str(sig), str(buckets), config=minhash)],
                   minhash.num_buckets),
                  ("near-3-clusters", [MinhashDedupCluster(str(buckets), str(clusters), config=minhash,
                                                           save_cluster_id=True)], 1),
                  ("near-4-filter", [*read, MinhashDedupFilter(str(clusters), load_cluster_ids=True,
                                                               exclusion_writer=_writer(removed / "near")),
                                     *(_final_writers(out) if last == "near" else [_writer(work / "after_near")])],
                   None)]
        read = _stage_reader(work / "after_near")
    if decontaminate:
        steps += [("decontaminate", [*read, NGramsDecontFilter(str(work / "decont_index"),
                                                                config=decont_config(n_grams), language=words,
                                                                exclusion_writer=_writer(removed / "contaminated")),
                                     *_final_writers(out)], None)]
    return steps


def run(sources: list[DedupSource], out: str | Path, *, exact: bool = True, near: bool = True,
        benchmark_items=None, tasks: int = 1, workers: int = 1, text_field: str = "text", id_field: str = "id",
        minhash: MinhashConfig | None = None, n_grams: int = 13) -> dict:
    """Runs every stage (skipping ranks finished by an earlier run) and writes the report; returns it."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names) or not sources:
        raise ValueError(f"Sources {names} must be given, each name once.")
    if tasks < 1 or workers < 1:
        raise ValueError(f"--tasks={tasks} and --workers={workers} must be >= 1.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index_stats = None
    if benchmark_items is not None:
        index_stats = build_index(benchmark_items, out / "work" / "decont_index", decont_config(n_grams))
        if not index_stats:
            raise ValueError("No benchmark item to decontaminate against: add --humaneval or --benchmark.")
    for name, steps, stage_tasks in pipelines(sources, out, exact=exact, near=near,
                                              decontaminate=benchmark_items is not None, text_field=text_field,
                                              id_field=id_field, minhash=minhash, n_grams=n_grams):
        n = stage_tasks or tasks
        LocalPipelineExecutor(steps, tasks=n, workers=min(workers, n), logging_dir=str(out / "logs" / name),
                              start_method="fork").run()  # workers inherit the imports (see the docstring)
    report = write_report(out, names)
    report["benchmarks"] = index_stats
    write_json(out / "report.json", report)
    return report


def _records_of(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _records(folder: Path):
    for path in sorted(folder.glob("*.jsonl")):
        yield from _records_of(path)


def write_report(out: Path, source_names: list[str]) -> dict:
    """report.json's counts and dropped.jsonl (one line per dropped document, with why)."""
    removed, work = out / "removed", out / "work"
    index = list(_records(work / "kept_index"))
    kept = Counter(r["dedup_source"] for r in index)
    dropped: dict[str, Counter] = {s: Counter() for s in STAGES}
    lines = []
    exact_removed = list(_records(removed / "exact"))
    if exact_removed:  # the kept copy of each: the first document with the same text that went on
        after = [{"sha256": _text_sha256(r["text"]), **r} for r in _records(work / "after_exact")] \
            if (work / "after_exact").exists() else index
        survivor = {}
        for r in after:
            survivor.setdefault(r["sha256"], (r["id"], r["dedup_source"]))
        for r in exact_removed:
            dropped["exact"][r["dedup_source"]] += 1
            kid, ksrc = survivor.get(_text_sha256(r["text"]), (None, None))
            lines.append({"id": r["id"], "source": r["dedup_source"], "stage": "exact", "why": "identical text",
                          "duplicate_of": kid, "duplicate_of_source": ksrc})
    near_removed = list(_records(removed / "near"))
    if near_removed:  # the kept member of each cluster: datatrove's cluster files name members by (rank, index)
        members: dict[int, list[str]] = {}
        for path in sorted((work / "minhash_clusters").glob("*.clusters")):
            ids = [r["id"] for r in _records_of(work / "minhash_ids" / f"{int(path.stem):05d}.jsonl")]
            for doc, cluster in np.fromfile(path, dtype=[("doc", "<u4"), ("cluster", "<u4")]).tolist():
                members.setdefault(cluster, []).append(ids[doc])
        gone = {r["id"] for r in near_removed}
        source_of = {r["id"]: r["dedup_source"] for r in index}
        if (work / "after_near").exists():
            source_of.update({r["id"]: r["dedup_source"] for r in _records(work / "after_near")})
        for r in near_removed:
            dropped["near"][r["dedup_source"]] += 1
            kept_ids = [m for m in members.get(r["minhash_cluster_id"], []) if m not in gone]
            kid = kept_ids[0] if kept_ids else None
            lines.append({"id": r["id"], "source": r["dedup_source"], "stage": "near",
                          "why": "MinHash near duplicate", "cluster": r["minhash_cluster_id"], "duplicate_of": kid,
                          "duplicate_of_source": source_of.get(kid)})
    for r in _records(removed / "contaminated"):
        dropped["contaminated"][r["dedup_source"]] += 1
        lines.append({"id": r["id"], "source": r["dedup_source"], "stage": "contaminated",
                      "why": f"shares a {len(r['contaminated_ngram'].split())}-gram with {r['contaminated_task']}",
                      "benchmark": r["contaminated_task"], "ngram": r["contaminated_ngram"]})
    tmp = out / ".dropped.jsonl.tmp"
    tmp.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    os.replace(tmp, out / "dropped.jsonl")
    by_source = {}
    for s in source_names:
        d = {stage: dropped[stage][s] for stage in STAGES}
        by_source[s] = {"input": kept[s] + sum(d.values()), **{f"dropped_{k}": v for k, v in d.items()},
                        "kept": kept[s]}
    totals = {k: sum(v[k] for v in by_source.values()) for k in next(iter(by_source.values()))}
    return {"sources": by_source, "total": totals, "output": {s: str(out / "output" / s) for s in source_names},
            "dropped_list": str(out / "dropped.jsonl")}
