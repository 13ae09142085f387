"""The embedded default corpus: the Python standard library's sources, tokenized by a SentencePiece model trained
on a sample of them. Built once per (Python version, vocab size) into a cache directory, atomically."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from phi_jax.data.corpus import SkipReport, stdlib_documents
from phi_jax.data.prepare import prepare_shards
from phi_jax.data.shards import FORMAT_VERSION, read_metadata
from phi_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from phi_jax.preemption import on_immediate_exit

log = logging.getLogger("phi_jax")

SAMPLE_CHARS = 3_500_000  # tokenizer training sample: every k-th file, ~3.5 MB


def default_cache_dir() -> Path:
    return Path(os.environ.get("PHI_JAX_CACHE") or Path.home() / ".cache" / "phi_jax")


@contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock, so concurrent processes on one machine build the corpus once."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _complete(data_dir: Path) -> bool:
    try:
        meta = read_metadata(data_dir)
    except (FileNotFoundError, ValueError):
        return False
    return (data_dir / meta["tokenizer_file"]).is_file()


class CacheDirError(OSError):
    """The corpus cache directory cannot be written; the message names it and the ways to choose another."""


def ensure_default_dataset(cache_dir: str | os.PathLike | None = None, vocab_size: int = 8192,
                           workers: int | None = None) -> tuple[Path, Path]:
    """(shard directory, tokenizer path) of the stdlib corpus, building and caching it on first use (timed in
    docs/PERFORMANCE.md, "Data loader")."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-sp{vocab_size}-v{FORMAT_VERSION}"
    data_dir = cache_dir / key
    if not _complete(data_dir):
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with _file_lock(cache_dir / f".{key}.lock"):
                if not _complete(data_dir):
                    _build(cache_dir, data_dir, vocab_size, workers)
        except OSError as e:  # read-only, full, or not a directory: the message names the cache, not the run
            raise CacheDirError(f"Cannot build the embedded corpus in the cache directory {cache_dir}: "
                                f"{e.strerror or e} ({e.filename or cache_dir}). Choose a writable one with "
                                "--config.data.cache_dir=DIR or PHI_JAX_CACHE=DIR, or train on your own shards "
                                "(--config.data.path).") from e
    meta = read_metadata(data_dir)
    return data_dir, data_dir / meta["tokenizer_file"]


STALE_SECONDS = 3600  # a temporary build directory untouched this long was left by a killed build


def _remove_stale_builds(cache_dir: Path, key: str) -> None:
    """Temporary directories of builds of `key` killed before they could remove them (SIGKILL). Called under the
    build lock; the age rule also keeps a build on another host of a shared filesystem (where the lock is only
    advisory) safe."""
    now = time.time()
    for tmp in cache_dir.glob(f".{key}.tmp-*"):
        newest = max((p.stat().st_mtime for p in tmp.rglob("*")), default=tmp.stat().st_mtime)
        if now - newest > STALE_SECONDS:
            log.info("removing %s, left by an interrupted build", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(tmp: Path) -> None:
    """rmtree, again if a file appeared meanwhile (a worker stopped a moment ago may have been writing)."""
    for _ in range(3):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return
        time.sleep(0.1)


def _build(cache_dir: Path, data_dir: Path, vocab_size: int, workers: int | None) -> None:
    log.info("building the embedded stdlib corpus in %s (once; about a minute)", data_dir)
    _remove_stale_builds(cache_dir, data_dir.name)
    start = time.perf_counter()
    report = SkipReport()
    docs = list(stdlib_documents(report))
    if not docs:
        raise RuntimeError("Found no Python standard-library sources to build the default corpus from.")
    stride = max(1, sum(map(len, docs)) // SAMPLE_CHARS)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{data_dir.name}.tmp-"))
    try:
        with on_immediate_exit(lambda: _remove(tmp)):  # a SIGTERM before training: exits without `finally`
            model = train_sentencepiece(docs[::stride], tmp / f"stdlib-sp{vocab_size}", vocab_size)
            log.info("trained the tokenizer in %.1f s", time.perf_counter() - start)
            prepare_shards(docs, load_tokenizer(model), tmp / "data", val_fraction=0.01, docs_per_shard=500,
                           workers=workers, report=report,
                           source=f"python {sys.version.split()[0]} standard library ({len(docs)} files)")
            try:
                os.rename(tmp / "data", data_dir)
            except OSError:  # another process finished first (the lock is advisory only on shared filesystems)
                if not _complete(data_dir):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the embedded corpus in %.1f s", time.perf_counter() - start)
