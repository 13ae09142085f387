"""Preparing token shards at any scale: pieces of documents tokenized in parallel, resumable, split across machines.

The documents are cut, by index, into pieces of `docs_per_shard`; piece i holds documents
[i * docs_per_shard, (i + 1) * docs_per_shard) and becomes train shard i; the pieces' few validation documents are
gathered, in order, into files of up to docs_per_shard documents. A piece is a pure function of its documents, so:
- workers tokenize and write whole pieces in parallel (`workers`);
- task t of `num_tasks` (a SLURM array, the hosts of a TPU pod) writes the pieces i with i % num_tasks == t, and
  `merge_shards` assembles them, so any number of tasks gives the same bytes;
- a task reads and decodes only its own pieces' documents when the source is a `corpus.Source` (files, JSON Lines,
  TFDS, the stdlib): the index is then the source's *unit* (file, non-blank line, record), listed cheaply before
  decoding, and a unit that turns out bad (not UTF-8, a bad line) is a hole in its piece, counted in its task's
  skip report (the merge adds them up). Any other iterable is read whole by every task (logged once);
- a killed run leaves its finished pieces in `.OUT.partial/` and the next run with the same settings skips them
  (after checking that their documents have not changed).
Memory stays bounded: a task holds at most 2 x workers pieces, and lengths live in per-piece numpy files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from phi_jax.data.corpus import SkipReport, Source
from phi_jax.data.shards import (
    FORMAT_VERSION,
    SPLITS,
    file_record,
    is_val,
    prepared_files,
    read_json,
    replace_dir,
    token_dtype,
)
from phi_jax.data.tokenizer import Tokenizer
from phi_jax.preemption import on_immediate_exit

log = logging.getLogger("phi_jax")

DOCS_PER_SHARD = 10_000
_WRITER_OPTIONS = "group_size:1"  # group size 1 = cheap random access (grain's recommendation); zstd by default


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """An existing, non-empty `out_dir` is refused; with `overwrite`, only a previous preparation's output (the
    files its metadata.json lists, nothing else) may be replaced: never a user's other files."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; choose another --out.")
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace a "
                              "previous preparation there, or choose another --out.")
    owned: set[str] = set()
    if "metadata.json" in entries:
        try:
            owned = prepared_files(read_json(out_dir / "metadata.json", ""))
        except (ValueError, KeyError, TypeError):  # not a preparation's metadata.json: nothing is recognised
            owned = set()
    if foreign := sorted(entries - owned):
        what = "is not a prepare_data output" if not owned else "holds files the previous preparation did not write"
        raise FileExistsError(f"{out_dir} {what} ({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                              "--overwrite replaces only an empty directory or a previous preparation (the files "
                              "its metadata.json lists). Move those files or choose another --out.")


def work_dir(out_dir: Path) -> Path:
    """Where the pieces of an unfinished preparation of `out_dir` live (beside it, hidden)."""
    return out_dir.parent / f".{out_dir.name}.partial"


def _unique_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other writer uses (several tasks of one preparation, started at
    once on a shared filesystem, write the same files)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _write_json(path: Path, obj: dict) -> None:
    tmp = _unique_tmp(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_file(src: Path, dst: Path) -> None:
    tmp = _unique_tmp(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _docs_sha256(docs: list[str | None]) -> str:
    h = hashlib.sha256()
    for d in docs:
        if d is None:  # a hole (a bad unit); a piece without holes hashes as a plain list of documents
            h.update(b"\xff" * 8)
            continue
        h.update(len(d).to_bytes(8, "little"))
        h.update(d.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer, parent: int) -> None:
    global _worker_tokenizer
    _die_with_parent(parent)
    _worker_tokenizer = tokenizer


def _die_with_parent(parent: int) -> None:
    """A worker ends when the process that started it does, however it ends (SIGKILL, os._exit): Linux's
    PR_SET_PDEATHSIG. Elsewhere the pool's shutdown is the only stop."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _workers(pool) -> list:
    return list((getattr(pool, "_processes", None) or {}).values())


def _freeze_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """For an exit at once (os._exit follows): the workers are stopped (SIGSTOP), so that they write nothing more
    while their temporary files are removed, and then end with their parent (PR_SET_PDEATHSIG's SIGKILL). Killing
    them here would let the parent's main thread see a broken pool and exit first, with another status."""
    for process in _workers(pool):
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGSTOP if sys.platform == "linux" else signal.SIGKILL)


def _stop(pool: concurrent.futures.ProcessPoolExecutor, timeout_s: float = 10.0) -> None:
    """Ends the workers now (an error or an interrupt): pieces in flight are abandoned, not finished. The pool's
    shutdown waits at most `timeout_s` (its manager thread can block on a queue whose workers were killed); past
    that, one warning, and the exit is bounded by phi_jax.cli.exit_within."""
    processes = _workers(pool)
    for process in processes:
        process.kill()
    for process in processes:
        process.join(2)
    # The pool's feeder thread may be blocked writing a piece into the call queue's pipe, which no worker reads any
    # more; our end of the pipe is its last reader: closing it fails that write (recorded on the abandoned futures)
    # instead of blocking the shutdown forever. CPython does this itself from 3.11.4 on (gh-94777); Debian 12's
    # python3 is 3.11.2.
    with contextlib.suppress(AttributeError, OSError):
        pool._call_queue._reader.close()
    stopper = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    if stopper.is_alive():
        log.warning("the tokenizer workers' pool did not shut down within %.0f s after its workers were stopped; "
                    "going on without it", timeout_s)


def _write_piece_in_worker(*args) -> dict:
    return write_piece(_worker_tokenizer, *args)


def write_piece(tokenizer: Tokenizer, work: Path, piece: int, first_doc: int, docs: list[str | None],
                val_fraction: float, encode: Callable | None = None) -> dict:
    """Tokenizes one piece into work/{train,val}-<piece>.array_record + lengths; returns (and writes) its manifest.

    docs[j] is document first_doc + j, or None: a hole (a bad unit of a `corpus.Source`), which takes its index.

    `encode(tokenizer, doc) -> (token ids, loss mask)` replaces the plain text + eos (SFT: phi_jax/data/sft.py);
    each record then holds the ids followed by one mask byte per token."""
    from array_record.python.array_record_module import ArrayRecordWriter

    vocab, eos = tokenizer.vocab_size, tokenizer.eos_id
    dtype = token_dtype(vocab)
    is_val_doc = [is_val(first_doc + j, val_fraction) for j in range(len(docs))]
    manifest = {"piece": piece, "first_doc": first_doc, "documents": sum(d is not None for d in docs),
                "input_sha256": _docs_sha256(docs)}
    for split in SPLITS:
        chosen = [d for d, v in zip(docs, is_val_doc, strict=True) if d is not None and v == (split == "val")]
        name = f"{split}-{piece:05d}"
        if not chosen:
            manifest[split] = None
            continue
        lengths, max_id = np.zeros(len(chosen), np.int64), -1
        writer = ArrayRecordWriter(str(work / f"{name}.array_record"), _WRITER_OPTIONS)
        for j, text in enumerate(chosen):
            mask = None
            if encode is None:
                tokens = np.asarray([*tokenizer.encode(text), eos], dtype=np.int64)
            else:
                tokens, mask = encode(tokenizer, text)
            if tokens.min() < 0 or tokens.max() >= vocab:
                bad = int(tokens.max()) if tokens.max() >= vocab else int(tokens.min())
                raise ValueError(f"A document of piece {piece} has token id {bad} outside the tokenizer's "
                                 f"vocab_size {vocab}: the tokenizer reports a wrong vocab_size.")
            writer.write(tokens.astype(dtype).tobytes() + (b"" if mask is None else mask.astype(np.uint8).tobytes()))
            lengths[j], max_id = len(tokens), max(max_id, int(tokens.max()))
        writer.close()
        np.save(work / f"{name}-lengths.npy", lengths)
        manifest[split] = {"shard": file_record(work, f"{name}.array_record", records=len(chosen)),
                           "lengths": f"{name}-lengths.npy", "documents": len(chosen),
                           "tokens": int(lengths.sum()), "max_token_id": max_id}
    _write_json(work / f"piece-{piece:05d}.json", manifest)
    return manifest


def _pieces(documents: Iterable[str], docs_per_shard: int) -> Iterator[tuple[int, int, list[str]]]:
    """(piece index, index of its first document, its documents) in order; the last piece may be short."""
    piece, buf, first = 0, [], 0
    for doc in documents:
        buf.append(doc)
        if len(buf) == docs_per_shard:
            yield piece, first, buf
            piece, first, buf = piece + 1, first + len(buf), []
    if buf:
        yield piece, first, buf


class _Listing:
    """What a task learns of a `corpus.Source` while listing it: units, their fingerprint, and the unit index of
    each skip example its own decoding recorded (to merge the tasks' examples in source order)."""

    def __init__(self):
        self.units, self.sha256, self.example_units = 0, hashlib.sha256(), []


def _unit_pieces(source: Source, docs_per_shard: int, mine: Callable[[int], bool], report: dict,
                 listing: _Listing) -> Iterator[tuple[int, int, list[str | None] | None]]:
    """(piece index, index of its first unit, its documents with None for bad units, or None if the piece is not
    `mine`: not decoded), listing every unit but decoding only those of `mine` pieces."""
    examples = report.get("examples") if isinstance(report.get("examples"), list) else None
    piece, first, buf = 0, 0, []
    for u, (unit, size) in enumerate(source.units()):
        listing.units, p = u + 1, u // docs_per_shard
        listing.sha256.update(size.to_bytes(8, "little"))
        if p != piece:
            yield piece, first, buf if mine(piece) else None
            piece, first, buf = p, u, []
        if mine(p):
            seen = len(examples) if examples is not None else 0
            buf.append(source.decode(unit))
            if examples is not None:
                listing.example_units += [u] * (len(examples) - seen)
    if listing.units:
        yield piece, first, buf if mine(piece) else None


def _load_done(work: Path, piece: int) -> dict | None:
    """A finished piece's manifest, or None if it is missing or its files are not all there at their sizes."""
    path = work / f"piece-{piece:05d}.json"
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, "")
    except ValueError as e:  # written atomically, so damaged afterwards: the piece is made again
        log.warning("%s; tokenizing piece %d again", str(e).rstrip(": ."), piece)
        return None
    for split in SPLITS:
        if (info := manifest[split]) is not None:
            shard = work / info["shard"]["file"]
            if not shard.is_file() or shard.stat().st_size != info["shard"]["bytes"]:
                return None
            if not (work / info["lengths"]).is_file():
                return None
    return manifest


class _EmptySplit(ValueError):
    pass


class _SourceChanged(ValueError):
    pass


def _after_failure(work: Path, num_tasks: int, error: BaseException) -> None:
    """A failed or interrupted task: finished pieces are kept for the next run of the same command (which checks
    that their documents have not changed), and said so; a work directory with nothing finished is removed (only
    by a single-task preparation: other tasks may be using it)."""
    pieces = sorted(work.glob("piece-*.json")) if work.is_dir() else []
    if num_tasks == 1 and (not pieces or isinstance(error, _EmptySplit)):  # nothing of this run is worth resuming
        shutil.rmtree(work, ignore_errors=True)
    elif pieces and not isinstance(error, _SourceChanged):
        log.warning("kept %d finished piece(s) in %s: the same command resumes from them (skipping what is done); "
                    "delete that directory to start over", len(pieces), work)


def _check_splits(documents: int, val: int, val_fraction: float, report: dict) -> None:
    """Raises, before anything is written, when the train split would be empty (`documents`, `val` of them
    validation), or the validation split with val_fraction > 0 (document 0 is always a validation document, but
    with a `corpus.Source` it may be a bad unit, skipped)."""
    skipped = ", ".join(f"{v} {k.replace('_', ' ')} skipped" for k, v in report.items() if isinstance(v, int) and v)
    if documents and val_fraction > 0 and val == 0:
        raise _EmptySplit(f"The source gave {documents} documents ({skipped or 'none skipped'}): {documents} train, "
                          f"0 validation with val_fraction={val_fraction}: the validation documents (every "
                          "~1/val_fraction-th of the source, its first included) were all skipped. Add documents, "
                          "or set --val_fraction=0 to train on all of them.")
    if documents - val == 0:
        raise _EmptySplit(f"The source gave {documents} documents ({skipped or 'none skipped'}): 0 train, {val} "
                          f"validation with val_fraction={val_fraction}; no training documents. Add documents, or "
                          "set --val_fraction=0 to train on all of them.")


def prepare_shards(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                   val_fraction: float = 0.01, docs_per_shard: int = DOCS_PER_SHARD, workers: int | None = None,
                   overwrite: bool = False, source: str = "", num_tasks: int = 1, task_index: int = 0,
                   report: dict | None = None, encode: Callable | None = None) -> dict | None:
    """Tokenizes `documents` (eos after each) into train/val ArrayRecord shards in `out_dir`; returns the metadata.

    `encode` (picklable, with an `identity()`; phi_jax.data.sft.SftEncoder) tokenizes each document into token ids
    and a loss mask instead: the shards then carry the mask (metadata "loss_mask": true).

    With num_tasks > 1 this task writes its share of the pieces and returns None; `merge_shards` then finishes.
    A `corpus.Source` is decoded only for this task's pieces (see the module's docstring); any other iterable is
    read whole by every task.
    `report` is the document source's count of what it skipped (corpus.SkipReport), recorded in the metadata
    (with a Source, what this task's decoding skipped: the merge adds the tasks' reports up).
    """
    out_dir = Path(out_dir).absolute()
    check_replaceable(out_dir, overwrite)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"{val_fraction=} must be in [0, 1).")
    if docs_per_shard < 1:
        raise ValueError(f"{docs_per_shard=} must be >= 1.")
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index={task_index} must be in [0, num_tasks={num_tasks}) (num_tasks >= 1).")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers} must be >= 1 (leave it unset for one per core).")
    workers = workers or os.cpu_count() or 1
    work = work_dir(out_dir)
    params = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer.identity(), "eos_id": tokenizer.eos_id,
              "val_fraction": val_fraction, "docs_per_shard": docs_per_shard, "source": source}
    if encode is not None:
        params["encoding"] = encode.identity()
    if (work / "params.json").is_file():
        if (old := read_json(work / "params.json", f"delete {work} to start over")) != params:
            raise ValueError(f"{work / 'params.json'} records an unfinished preparation with other settings ({old});"
                             f" delete {work} to start over, or run with the same settings to resume it.")
        log.info("resuming the preparation in %s", work)
    else:
        work.mkdir(parents=True, exist_ok=True)
        _write_json(work / "params.json", params)
    if not (work / tokenizer.path.name).is_file():
        _copy_file(tokenizer.path, work / tokenizer.path.name)

    report = report if report is not None else {}
    split = isinstance(documents, Source)
    listing = _Listing()
    if split:
        pieces = _unit_pieces(documents, docs_per_shard, lambda p: p % num_tasks == task_index, report, listing)
    else:
        if num_tasks > 1:
            log.info("the source is not a corpus.Source (files, JSONL, TFDS): every task reads and decodes all of "
                     "it and tokenizes its share")
        pieces = _pieces(iter(documents), docs_per_shard)
    total, reused, written, seen, seen_val = 0, 0, 0, 0, 0
    pool = None
    if workers > 1:  # spawn, not fork: the caller may run JAX's threads, which a forked child would inherit mid-lock
        pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_worker,
                                                      (tokenizer, os.getpid()))
    pending: set[concurrent.futures.Future] = set()
    stack = contextlib.ExitStack()
    if pool is not None:  # a signal that ends the process at once (training's, before its first step) ends them
        stack.enter_context(on_immediate_exit(lambda: _freeze_workers(pool)))
    try:
        for piece, first, docs in pieces:
            if piece % num_tasks != task_index:
                if not split:
                    total = first + len(docs)
                continue
            total = first + len(docs)
            seen += sum(d is not None for d in docs)
            seen_val += sum(d is not None and is_val(first + j, val_fraction) for j, d in enumerate(docs))
            if (done := _load_done(work, piece)) is not None:
                if done["input_sha256"] != _docs_sha256(docs) or done["documents"] != sum(d is not None
                                                                                           for d in docs):
                    raise _SourceChanged(f"The documents of piece {piece} differ from those the interrupted "
                                         f"preparation in {work} tokenized: the source changed. Delete {work} to "
                                         "start over.")
                reused += 1
                continue
            if pool is None:
                write_piece(tokenizer, work, piece, first, docs, val_fraction, encode)
            else:
                if len(pending) >= 2 * workers:  # bounded memory: at most 2 x workers pieces in flight
                    finished, pending = concurrent.futures.wait(pending, return_when="FIRST_COMPLETED")
                    for f in finished:
                        f.result()
                pending.add(pool.submit(_write_piece_in_worker, work, piece, first, docs, val_fraction, encode))
            written += 1
        if split:
            total = listing.units
        if not split:  # every task saw every document
            _check_splits(total, sum(is_val(i, val_fraction) for i in range(total)), val_fraction, report)
        elif num_tasks == 1:  # else the merge checks, when all tasks have counted theirs
            _check_splits(seen, seen_val, val_fraction, report)
        for f in concurrent.futures.as_completed(pending):
            f.result()
    except BaseException as e:  # an error in the source or a piece, a signal (KeyboardInterrupt), ...
        if pool is not None:
            _stop(pool)
            pool = None
        _after_failure(work, num_tasks, e)
        raise
    finally:
        stack.close()
        if pool is not None:
            pool.shutdown()
    record = {"documents": total, "pieces": -(-total // docs_per_shard), "report": report}
    if split:  # "documents" counts the units; this task decoded only its own, and its report is its own
        record.update(units_sha256=listing.sha256.hexdigest(), example_units=listing.example_units)
    _write_json(work / f"task-{task_index:05d}-of-{num_tasks:05d}.json", record)
    log.info("task %d/%d: %d pieces written, %d reused from an interrupted run; %d documents in the source%s",
             task_index, num_tasks, written, reused, total,
             f" ({seen} of this task's decoded)" if split and num_tasks > 1 else "")
    if num_tasks > 1:
        return None
    return merge_shards(out_dir, overwrite=overwrite)


def _task_record(path: Path) -> dict:
    """A finished task's record (documents seen, pieces, skip report), checked for its shape."""
    record = read_json(path, "delete it and run that task again")
    if not (isinstance(record, dict) and isinstance(record.get("documents"), int)
            and isinstance(record.get("pieces"), int) and isinstance(record.get("report"), dict)):
        raise ValueError(f"{path} is not a task record of prepare_data: delete it and run that task again.")
    return record


def _merged_report(records: list[dict]) -> dict:
    """The tasks' skip reports as one: counts added up, examples in source order (the first few, as a single task
    would have recorded them: each task kept its own first few, with their unit indices)."""
    merged: dict = {}
    for key, value in records[0]["report"].items():
        if key == "examples":
            found = []
            for r in records:  # an example the task's own decoding did not record (a caller's report) goes last
                units = r["example_units"] + [2**63] * (len(r["report"]["examples"]) - len(r["example_units"]))
                found += zip(units, r["report"]["examples"], strict=False)
            found.sort(key=lambda ue: ue[0])
            merged[key] = [e for _, e in found][:SkipReport.MAX_EXAMPLES]
        elif isinstance(value, int):
            merged[key] = sum(r["report"].get(key, 0) for r in records)
        else:
            merged[key] = value
    return merged


def merge_shards(out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Assembles the pieces every task wrote into `out_dir` (train/val shards, lengths, metadata.json)."""
    out_dir = Path(out_dir).absolute()
    work = work_dir(out_dir)
    if not (work / "params.json").is_file():
        raise FileNotFoundError(f"{work} holds no prepared pieces: run python -m tools.prepare_data for every task "
                                "first.")
    check_replaceable(out_dir, overwrite)
    params = read_json(work / "params.json", f"delete {work} and prepare again")
    tasks = sorted(work.glob("task-*-of-*.json"))
    if not tasks:
        raise FileNotFoundError(f"No task of the preparation in {work} has finished: run them all, then merge.")
    num_tasks = int(tasks[0].stem.split("-of-")[1])
    records = {p.name: _task_record(p) for p in tasks}
    expected = {f"task-{t:05d}-of-{num_tasks:05d}.json" for t in range(num_tasks)}
    if missing := sorted(expected - set(records)):
        raise FileNotFoundError(f"{work}: tasks {missing} have not finished (or ran with another --num_tasks): run "
                                "them, then merge.")
    first = records[min(expected)]
    split = "units_sha256" in first  # a corpus.Source: each task decoded its own pieces only
    for name in expected:
        same = ("documents", "units_sha256") if split else ("documents", "report")
        if any(records[name].get(k) != first.get(k) for k in same):
            raise ValueError(f"{work}: the tasks saw different sources ({name} counted {records[name]['documents']} "
                             f"documents, another {first['documents']}"
                             f"{', of other sizes' if records[name]['documents'] == first['documents'] else ''}): "
                             "every task must read the same documents.")
    report = _merged_report([records[n] for n in sorted(expected)]) if split else first["report"]
    manifests = [_load_done(work, i) for i in range(first["pieces"])]
    if missing := [i for i, m in enumerate(manifests) if m is None]:
        raise FileNotFoundError(f"{work}: pieces {missing[:10]} are missing or incomplete: re-run their tasks.")
    _check_splits(sum(m["documents"] for m in manifests),
                  sum(m["val"]["documents"] for m in manifests if m["val"] is not None),
                  params["val_fraction"], report)

    tok = params["tokenizer"]
    merged = work / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir()
    splits = {}
    for split in SPLITS:
        parts = [m[split] for m in manifests if m[split] is not None]
        if split == "val":  # a few documents per piece: gathered into files of up to docs_per_shard documents
            shards = _gather(work, parts, merged, split, params["docs_per_shard"])
        else:
            shards = []
            for j, part in enumerate(parts):
                name = f"{split}-{j:05d}-of-{len(parts):05d}.array_record"
                _link(work / part["shard"]["file"], merged / name)
                shards.append({**part["shard"], "file": name})
        lengths_name = f"{split}-lengths.npy"
        n = sum(p["documents"] for p in parts)
        lengths = np.lib.format.open_memmap(merged / lengths_name, mode="w+", dtype=np.int64, shape=(n,))
        at = 0
        for part in parts:  # one piece at a time: memory stays bounded whatever the corpus size
            piece_lengths = np.load(work / part["lengths"])
            lengths[at:at + len(piece_lengths)] = piece_lengths
            at += len(piece_lengths)
        lengths.flush()
        del lengths
        splits[split] = {"documents": n, "tokens": sum(p["tokens"] for p in parts),
                         "max_token_id": max([p["max_token_id"] for p in parts], default=-1),
                         "shards": shards, "lengths": file_record(merged, lengths_name)}
    shutil.copyfile(work / tok["path"], merged / tok["path"])
    vocab = tok["vocab_size"]
    meta = {"format_version": FORMAT_VERSION, "tokenizer": tok, "tokenizer_file": tok["path"], "vocab_size": vocab,
            "eos_id": params["eos_id"], "dtype": token_dtype(vocab).name, "source": params["source"],
            "val_fraction": params["val_fraction"], "docs_per_shard": params["docs_per_shard"],
            "skipped": report, "max_token_id": max(s["max_token_id"] for s in splits.values()),
            "splits": splits}
    if "encoding" in params:  # SFT: each record is ids then one loss-mask byte per token (phi_jax/data/shards.py)
        meta.update(loss_mask=True, encoding=params["encoding"])
    (merged / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(merged, out_dir)
    shutil.rmtree(work, ignore_errors=True)
    log.info("wrote %s: %d train / %d val documents, %d / %d tokens", out_dir, splits["train"]["documents"],
             splits["val"]["documents"], splits["train"]["tokens"], splits["val"]["tokens"])
    return meta


def _gather(work: Path, parts: list[dict], merged: Path, split: str, per_file: int) -> list[dict]:
    """The pieces' shards of `split` rewritten, in order, into files of up to `per_file` documents (whole pieces;
    at least one per file). The validation split holds ~val_fraction of each piece: one file per piece would be
    thousands of files, each at least 128 KiB (ArrayRecord's index block), for a handful of documents each."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    groups: list[list[dict]] = []
    for part in parts:
        if not groups or sum(p["documents"] for p in groups[-1]) + part["documents"] > per_file:
            groups.append([])
        groups[-1].append(part)
    shards = []
    for j, group in enumerate(groups):
        name = f"{split}-{j:05d}-of-{len(groups):05d}.array_record"
        writer = ArrayRecordWriter(str(merged / name), _WRITER_OPTIONS)
        for part in group:
            reader = ArrayRecordReader(str(work / part["shard"]["file"]))
            for start in range(0, part["documents"], 1024):  # bounded memory
                for record in reader.read(start, min(start + 1024, part["documents"])):
                    writer.write(record)
            reader.close()
        writer.close()
        shards.append(file_record(merged, name, records=sum(p["documents"] for p in group)))
    return shards


def _link(src: Path, dst: Path) -> None:
    """A hard link (the pieces stay until the merge is complete, so an interrupted merge can be re-run)."""
    try:
        os.link(src, dst)
    except OSError as e:  # a filesystem without hard links (some FUSE mounts): copy, and say so
        log.warning("cannot hard-link %s (%s): copying instead", src, e)
        shutil.copyfile(src, dst)
