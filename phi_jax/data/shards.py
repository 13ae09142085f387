"""Token shards on disk: ArrayRecord files with one document's token ids per record, plus `metadata.json`.

Layout of a data directory:
    metadata.json                          format version, tokenizer identity, per-split counts
    train-00000-of-00004.array_record      record = one document's tokens (eos appended) as raw uint16/uint32
    train-lengths.npy                      token count of every document, in document order
    val-00000-of-00001.array_record, val-lengths.npy
    <tokenizer file>                       a copy of the tokenizer that made the shards

Document j of a split lives in shard j % num_shards at position j // num_shards, so reading the records back in
that interleaved order gives the documents in their original order.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import numpy as np

from phi_jax.data.tokenizer import Tokenizer

log = logging.getLogger("phi_jax")

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_WRITER_OPTIONS = "group_size:1"  # group size 1 = cheap random access (grain's recommendation); zstd by default
_PREPARE_HINT = "run tools/prepare_data.py (or leave --config.data.path empty for the embedded stdlib corpus)"


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_val(index: int, val_fraction: float) -> bool:
    """Deterministic split by document index: document 0 and then every ~1/val_fraction-th document is validation."""
    if val_fraction <= 0:
        return False
    offset = 1.0 - val_fraction
    return math.floor((index + 1) * val_fraction + offset) > math.floor(index * val_fraction + offset)


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode(text: str) -> list[int]:
    return _worker_tokenizer.encode(text)


def _tokenized(documents: Iterable[str], tokenizer: Tokenizer, workers: int) -> Iterable[list[int]]:
    """Token ids of each document, in order; a process pool when workers > 1."""
    if workers <= 1:
        yield from map(tokenizer.encode, documents)
        return
    # spawn, not fork: the caller may already run JAX's threads, which a forked child would inherit mid-lock.
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,)) as pool:
        yield from pool.imap(_encode, documents, chunksize=8)


def prepare_shards(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                   val_fraction: float = 0.01, num_shards: int = 4, workers: int | None = None,
                   overwrite: bool = False, source: str = "") -> dict:
    """Tokenizes `documents` (eos after each) into train/val ArrayRecord shards in `out_dir`; returns the metadata.

    The directory is built under a temporary name and renamed when complete, so it is never seen half-written.
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"{val_fraction=} must be in [0, 1).")
    if num_shards < 1:
        raise ValueError(f"{num_shards=} must be >= 1.")
    workers = workers or os.cpu_count() or 1
    vocab_size, eos = tokenizer.vocab_size, tokenizer.eos_id
    dtype = token_dtype(vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        counts = {"train": num_shards, "val": 1}
        writers = {s: [ArrayRecordWriter(str(tmp / shard_name(s, i, n)), _WRITER_OPTIONS) for i in range(n)]
                   for s, n in counts.items()}
        lengths: dict[str, list[int]] = {s: [] for s in SPLITS}
        max_id = {s: -1 for s in SPLITS}
        bar = tqdm(desc="tokenizing", unit=" docs", disable=None)
        for index, ids in enumerate(_tokenized(documents, tokenizer, workers)):
            tokens = np.asarray([*ids, eos], dtype=np.int64)
            if tokens.min() < 0 or tokens.max() >= vocab_size:
                bad = int(tokens.max()) if tokens.max() >= vocab_size else int(tokens.min())
                raise ValueError(f"Document {index} has token id {bad} outside the tokenizer's vocab_size "
                                 f"{vocab_size}: the tokenizer reports a wrong vocab_size.")
            split = "val" if is_val(index, val_fraction) else "train"
            j = len(lengths[split])
            writers[split][j % counts[split]].write(tokens.astype(dtype).tobytes())
            lengths[split].append(len(tokens))
            max_id[split] = max(max_id[split], int(tokens.max()))
            bar.update()
        bar.close()
        for ws in writers.values():
            for w in ws:
                w.close()
        splits = {}
        for s in SPLITS:
            np.save(tmp / f"{s}-lengths.npy", np.asarray(lengths[s], dtype=np.int64))
            splits[s] = {"documents": len(lengths[s]), "tokens": int(sum(lengths[s])), "max_token_id": max_id[s],
                         "shards": [shard_name(s, i, counts[s]) for i in range(counts[s])],
                         "lengths": f"{s}-lengths.npy"}
        if splits["train"]["documents"] == 0:
            raise ValueError("No training documents: the source is empty.")
        tokenizer_file = tokenizer.path.name
        shutil.copyfile(tokenizer.path, tmp / tokenizer_file)
        meta = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer.identity(), "tokenizer_file": tokenizer_file,
                "vocab_size": vocab_size, "eos_id": eos, "dtype": dtype.name, "source": source,
                "val_fraction": val_fraction, "max_token_id": max(max_id.values()), "splits": splits}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d train / %d val documents, %d / %d tokens", out_dir, splits["train"]["documents"],
             splits["val"]["documents"], splits["train"]["tokens"], splits["val"]["tokens"])
    return meta


def _replace_dir(src: Path, dst: Path) -> None:
    """Moves the finished directory `src` to `dst`, first moving aside whatever `dst` held."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        os.replace(dst, old / "d")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_metadata(data_dir: str | os.PathLike) -> dict:
    """The shards' metadata.json, after checking the directory holds a complete set of shards."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Data directory {data_dir} does not exist: {_PREPARE_HINT}.")
    path = data_dir / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} holds no token shards (no metadata.json): {_PREPARE_HINT}.")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')}, this code reads "
                         f"{FORMAT_VERSION}: re-run tools/prepare_data.py.")
    for split, info in meta["splits"].items():
        missing = [n for n in [*info["shards"], info["lengths"]] if not (data_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{data_dir} misses {split} shard files {missing}: {_PREPARE_HINT}.")
    return meta


def check_compatible(meta: dict, tokenizer: Tokenizer) -> None:
    """Raises if the shards were made with a different tokenizer (compared by the model file's sha256)."""
    made, given = meta["tokenizer"], tokenizer.identity()
    if made["sha256"] != given["sha256"]:
        raise ValueError(f"The shards were made with tokenizer {made['path']} (sha256 {made['sha256'][:12]}, "
                         f"vocab {made['vocab_size']}) but the given tokenizer is {given['path']} (sha256 "
                         f"{given['sha256'][:12]}, vocab {given['vocab_size']}): re-run tools/prepare_data.py with "
                         "this tokenizer, or leave the tokenizer unset to use the shards' own.")


class SplitReader:
    """Random access to one split: documents by index and slices of the stream of all documents joined."""

    def __init__(self, data_dir: str | os.PathLike, split: str, meta: dict | None = None):
        import grain

        data_dir = Path(data_dir)
        meta = meta or read_metadata(data_dir)
        if split not in meta["splits"]:
            raise ValueError(f"Unknown split {split!r}; {data_dir} has {sorted(meta['splits'])}.")
        info = meta["splits"][split]
        self.split, self.dtype = split, np.dtype(meta["dtype"])
        self.lengths = np.load(data_dir / info["lengths"])
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # document d is stream[offsets[d]:offsets[d+1]]
        self.num_tokens = int(self.offsets[-1])
        self._num_shards = len(info["shards"])
        self._source = grain.sources.ArrayRecordDataSource([str(data_dir / n) for n in info["shards"]])
        per_shard = [len(range(i, len(self.lengths), self._num_shards)) for i in range(self._num_shards)]
        self._shard_start = np.concatenate([[0], np.cumsum(per_shard)])
        if len(self._source) != len(self.lengths):
            raise ValueError(f"{data_dir}: {split} shards hold {len(self._source)} records but the lengths file "
                             f"lists {len(self.lengths)} documents; re-run tools/prepare_data.py.")
        self.document = lru_cache(maxsize=32)(self._document)

    def __len__(self) -> int:
        return len(self.lengths)

    def _document(self, d: int) -> np.ndarray:
        shard, pos = divmod(d, self._num_shards)[::-1]
        return np.frombuffer(self._source[int(self._shard_start[shard] + pos)], dtype=self.dtype)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int32, reading only the documents it spans."""
        d = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            doc = self.document(d)
            lo = start - int(self.offsets[d])
            hi = min(stop - int(self.offsets[d]), len(doc))
            parts.append(doc[lo:hi])
            start += hi - lo
            d += 1
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
