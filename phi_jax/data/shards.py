"""Token shards on disk: ArrayRecord files with one document's token ids per record, plus `metadata.json`.

Layout of a data directory (written by phi_jax/data/prepare.py):
    metadata.json                          format version, tokenizer identity, per-split counts, and every file's
                                           size, sha256 (and record count), checked when the directory is opened
    train-00000-of-00004.array_record      record = one document's tokens (eos appended) as raw uint16/uint32
    train-lengths.npy                      token count of every document, in document order
    val-00000-of-00001.array_record, val-lengths.npy
    <tokenizer file>                       a copy of the tokenizer that made the shards

The shards hold consecutive runs of documents: the records of the shards read in order are the documents in order.
Every file metadata.json names must lie inside the directory. SFT shards (metadata "loss_mask": true, from
phi_jax/data/sft.py) hold one example per record: its token ids, then one loss-mask byte (0/1) per token.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from phi_jax.data.tokenizer import Tokenizer, file_sha256
from phi_jax.paths import is_url, user_path

log = logging.getLogger("phi_jax")

FORMAT_VERSION = 2  # 2: contiguous shards, file sizes and checksums in metadata.json
SPLITS = ("train", "val")
_PREPARE_HINT = "run python -m tools.prepare_data (or leave --config.data.path empty for the embedded stdlib corpus)"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_val(index: int, val_fraction: float) -> bool:
    """Deterministic split by document index: document 0 and then every ~1/val_fraction-th document is validation."""
    if val_fraction <= 0:
        return False
    offset = 1.0 - val_fraction
    return math.floor((index + 1) * val_fraction + offset) > math.floor(index * val_fraction + offset)


def file_record(directory: Path, name: str, **extra) -> dict:
    """What metadata.json records of a file, to check it at open: name, size and sha256 (and e.g. records)."""
    path = directory / name
    return {"file": name, "bytes": path.stat().st_size, "sha256": file_sha256(path), **extra}


def replace_dir(src: Path, dst: Path) -> None:
    """Moves the finished directory `src` to `dst`, first moving aside whatever `dst` held."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
        os.replace(dst, old / "d")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_json(path, fix: str) -> dict:
    """A JSON file's content; a file that is not JSON is an error naming it (and `fix`, what to do about it)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}){': ' + fix if fix else ''}.") from None


def prepared_files(meta: dict) -> set[str]:
    """The names of the files a preparation wrote, from its metadata.json: metadata.json, the tokenizer copy, and
    every split's shards and lengths file."""
    names = {"metadata.json", meta["tokenizer_file"]}
    for info in meta["splits"].values():
        names.update(record["file"] for record in [*info["shards"], info["lengths"]])
    return names


def _inside(data_dir, name: str, what: str):
    """data_dir / name, which must stay inside data_dir (metadata.json may not point elsewhere)."""
    if is_url(data_dir):
        path, inside = data_dir / name, not name.startswith("/") and ".." not in name.split("/")
    else:
        path = (data_dir / name).resolve()
        inside = path.is_relative_to(data_dir.resolve())
    if not inside:
        raise ValueError(f"{data_dir / 'metadata.json'} names {what} {name!r}, which resolves to {path} outside "
                         "the directory: a shard directory only reads its own files; re-run "
                         "python -m tools.prepare_data.")
    return path


def _check_file(data_dir, record: dict, what: str):
    """The file's path, after checking it exists with the recorded size (through epath: a fast check that also
    proves a bucket is readable before any shard reader, which retries for minutes, is built)."""
    path = _inside(data_dir, record["file"], what)
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} misses {what} {record['file']}: {_PREPARE_HINT}.")
    if (size := path.stat().length) != record["bytes"]:
        raise ValueError(f"{path} is {size} bytes but metadata.json records {record['bytes']}: the file is "
                         f"truncated or was replaced; copy it again or re-run python -m tools.prepare_data.")
    return path


def read_metadata(data_dir: str | os.PathLike) -> dict:
    """The shards' metadata.json, after checking the directory holds a complete set of shards (local or gs://)."""
    data_dir = user_path(data_dir)
    try:
        found = data_dir.is_dir()
    except Exception as e:  # a bucket that cannot be reached or read: credentials, endpoint, permissions
        raise FileNotFoundError(f"Cannot read data directory {data_dir}: {' '.join(str(e).split())[:300]}. Check "
                                "the path and the credentials (gcloud auth application-default login).") from e
    if not found:
        raise FileNotFoundError(f"Data directory {data_dir} does not exist: {_PREPARE_HINT}.")
    path = data_dir / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir} holds no token shards (no metadata.json): {_PREPARE_HINT}.")
    meta = read_json(path, "re-run python -m tools.prepare_data")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{path} has format_version {version}, this code reads "
                         f"{FORMAT_VERSION}: re-run python -m tools.prepare_data.")
    try:
        _inside(data_dir, meta["tokenizer_file"], "tokenizer file")
        for split, info in meta["splits"].items():
            for record in [*info["shards"], info["lengths"]]:
                _check_file(data_dir, record, f"{split} file")
        if missing := [k for k in ("tokenizer", "dtype", "max_token_id") if k not in meta]:
            raise KeyError(missing[0])  # read later by the loader and the checks: an error here, not there
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a complete shard description (missing or malformed {e}): "
                         "re-run python -m tools.prepare_data.") from None
    return meta


def _stamp(path) -> list:
    """What changes when a file is rewritten: size and modification time (and inode, locally); on gs:// the
    object's update time, which every new generation sets."""
    if is_url(path):
        st = path.stat()
        return [st.length, st.mtime]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verdict_path(cache_dir: Path, data_dir) -> Path:
    import hashlib

    return Path(cache_dir).expanduser() / "verified" / f"{hashlib.sha256(str(data_dir).encode()).hexdigest()[:24]}.json"


def verify_checksums(data_dir: str | os.PathLike, meta: dict, cache_dir: str | os.PathLike | None = None) -> None:
    """Checks every shard's sha256 and record count, and the lengths files', against metadata.json.

    With `cache_dir`, the verdict is remembered on this host, keyed by the directory and every file's size and
    modification time (inode locally; a gs:// object's update time, new with every generation): a dataset is read
    in full once, not at every start of every process. A file rewritten in any way is hashed again."""
    from array_record.python.array_record_module import ArrayRecordReader

    data_dir, start = user_path(data_dir), time.perf_counter()
    files = [record for info in meta["splits"].values() for record in [*info["shards"], info["lengths"]]]
    stamps = {record["file"]: [record["sha256"], *_stamp(_check_file(data_dir, record, "shard file"))]
              for record in files}
    verdict = _verdict_path(cache_dir, data_dir) if cache_dir else None
    if verdict is not None and verdict.is_file():
        try:
            if json.loads(verdict.read_text()) == {"path": str(data_dir), "files": stamps}:
                log.info("the checksums of %s were verified before (sizes and modification times unchanged)",
                         data_dir)
                return
        except (OSError, ValueError):
            pass  # an unreadable verdict is no verdict: hash again
    for split, info in meta["splits"].items():
        for record in [*info["shards"], info["lengths"]]:
            path = _check_file(data_dir, record, f"{split} file")
            if file_sha256(path) != record["sha256"]:
                raise ValueError(f"{path} does not match the sha256 in metadata.json: the file is corrupted; copy "
                                 "it again or re-run python -m tools.prepare_data.")
        for record in info["shards"]:
            reader = ArrayRecordReader(str(data_dir / record["file"]))
            n = reader.num_records()
            reader.close()
            if n != record["records"]:
                raise ValueError(f"{data_dir / record['file']} holds {n} records but metadata.json records "
                                 f"{record['records']}; re-run python -m tools.prepare_data.")
    log.info("verified the checksums of %s in %.1f s", data_dir, time.perf_counter() - start)
    if verdict is not None:
        try:
            verdict.parent.mkdir(parents=True, exist_ok=True)
            tmp = verdict.with_name(f".{verdict.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(data_dir), "files": stamps}))
            os.replace(tmp, verdict)
        except OSError as e:  # the verification itself passed; only its memo is lost
            log.warning("cannot record the verified checksums in %s (%s): the shards will be hashed again at the "
                        "next start", verdict.parent, e)


def check_compatible(meta: dict, tokenizer: Tokenizer, fix: str | None = None) -> None:
    """Raises if the shards were made with a different tokenizer (compared by the model file's sha256); `fix` words
    the way out for the caller (default: training's)."""
    made, given = meta["tokenizer"], tokenizer.identity()
    if made["sha256"] != given["sha256"]:
        fix = fix or ("re-run python -m tools.prepare_data with this tokenizer, or leave the tokenizer unset to use "
                      "the shards' own")
        raise ValueError(f"The shards were made with tokenizer {made['path']} (sha256 {made['sha256'][:12]}, "
                         f"vocab {made['vocab_size']}) but the given tokenizer is {given['path']} (sha256 "
                         f"{given['sha256'][:12]}, vocab {given['vocab_size']}): {fix}.")


def _unreadable(files: list[str]) -> str | None:
    """The first of `files` that array_record cannot open, or None."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in files:
        try:
            ArrayRecordReader(path).close()
        except RuntimeError:
            return path
    return None


class SplitReader:
    """Random access to one split: documents by index and slices of the stream of all documents joined."""

    def __init__(self, data_dir: str | os.PathLike, split: str, meta: dict | None = None):
        import grain

        data_dir = user_path(data_dir)
        meta = meta or read_metadata(data_dir)
        if split not in meta["splits"]:
            raise ValueError(f"Unknown split {split!r}; {data_dir} has {sorted(meta['splits'])}.")
        info = meta["splits"][split]
        if not info["shards"]:
            fix = ("prepare the shards with --val_fraction > 0, or set --config.eval_every=0" if split == "val" else
                   "prepare them from more documents")
            raise ValueError(f"The {split} split of {data_dir} holds no documents: {fix}.")
        self.split, self.dtype = split, np.dtype(meta["dtype"])
        self.has_loss_mask = bool(meta.get("loss_mask", False))  # SFT shards: a mask byte per token
        lengths_path = data_dir / info["lengths"]["file"]
        with lengths_path.open("rb") as f:
            try:
                self.lengths = np.load(io.BytesIO(f.read()), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise ValueError(f"{lengths_path} is not a lengths file ({' '.join(str(e).split())[:120]}): copy it "
                                 "again or re-run python -m tools.prepare_data.") from None
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])  # document d is stream[offsets[d]:offsets[d+1]]
        self.num_tokens = int(self.offsets[-1])
        # The shards hold consecutive documents, so record d of their concatenation is document d.
        self._files = [str(data_dir / s["file"]) for s in info["shards"]]
        self._ends = np.cumsum([s["records"] for s in info["shards"]])  # record d lies in file searchsorted(ends, d)
        try:
            self._source = grain.sources.ArrayRecordDataSource(self._files)
        except RuntimeError as e:  # Riegeli names no file: find the one that does not open
            raise ValueError(f"{_unreadable(self._files) or self._files} cannot be read as ArrayRecord "
                             f"({' '.join(str(e).split())[:200]}): copy it again or re-run python -m "
                             "tools.prepare_data.") from None
        if len(self._source) != len(self.lengths):
            raise ValueError(f"{data_dir}: {split} shards hold {len(self._source)} records but the lengths file "
                             f"lists {len(self.lengths)} documents; re-run python -m tools.prepare_data.")
        self.document = lru_cache(maxsize=32)(self._document)

    def __len__(self) -> int:
        return len(self.lengths)

    def _document(self, d: int) -> np.ndarray:
        try:
            raw = self._source[int(d)]
        except Exception as e:  # Riegeli's "hash mismatch" of a damaged chunk names no file
            path = self._files[min(int(np.searchsorted(self._ends, d, side="right")), len(self._files) - 1)]
            raise ValueError(f"Reading document {d} of the {self.split} split from {path} failed, the file is "
                             f"damaged ({' '.join(str(e).split())[:200]}): copy it again or re-run python -m "
                             "tools.prepare_data; --config.data.verify_checksums=True finds such files at start-up."
                             ) from None
        if self.has_loss_mask:
            return np.frombuffer(raw, dtype=self.dtype, count=int(self.lengths[d]))
        return np.frombuffer(raw, dtype=self.dtype)

    def example(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """SFT shards: document d's (token ids, loss mask: 1 where the token is a target)."""
        if not self.has_loss_mask:
            raise ValueError(f"The {self.split} split holds no loss mask (not SFT shards: tools.prepare_data "
                             "--source=sft makes them).")
        raw, n = self._source[int(d)], int(self.lengths[d])
        return (np.frombuffer(raw, dtype=self.dtype, count=n),
                np.frombuffer(raw, dtype=np.uint8, offset=n * self.dtype.itemsize))

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
