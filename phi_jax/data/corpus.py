"""Document sources: each yields one str per document, in a deterministic order."""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger("phi_jax")


def _read_text(path: Path) -> str | None:
    """The file decoded as UTF-8 with its newlines untouched; None if it cannot be read or decoded."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        log.debug("skipping %s: %s", path, e)
        return None


def stdlib_files() -> list[Path]:
    """The Python standard library's .py files (no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents() -> Iterator[str]:
    """Every readable, UTF-8 standard-library source file, one document each: an embedded corpus of ~31 MB."""
    for path in stdlib_files():
        if (text := _read_text(path)) is not None:
            yield text


def file_documents(globs: str | Iterable[str]) -> Iterator[str]:
    """Files matching the glob patterns (`**` recurses), sorted, each once; undecodable files are skipped."""
    globs = [globs] if isinstance(globs, str) else list(globs)
    paths = sorted({Path(p) for g in globs for p in glob.glob(os.path.expanduser(g), recursive=True)})
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FileNotFoundError(f"No files match {globs}.")
    for path in paths:
        if (text := _read_text(path)) is not None:
            yield text


def jsonl_documents(paths: str | Iterable[str], text_field: str = "text") -> Iterator[str]:
    """The `text_field` of every line of JSON Lines files, in file then line order."""
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise KeyError(f"{path}:{lineno} has no field {text_field!r} (fields: {sorted(record)}); "
                                   "pass --text_field.")
                yield record[text_field]


def tfds_documents(name: str, data_dir: str | None = None, split: str = "train",
                   text_field: str = "text") -> Iterator[str]:
    """A TFDS dataset's text field read through `tfds.data_source` (array_record files; TensorFlow not needed)."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, data_dir=data_dir, split=split)
    for i in range(len(source)):
        record = source[i]
        if text_field not in record:
            raise KeyError(f"TFDS {name}[{split}] record {i} has no field {text_field!r} (fields: {sorted(record)}).")
        text = record[text_field]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


SOURCES = ("stdlib", "files", "jsonl", "tfds")


def documents(source: str, *, globs: Iterable[str] = (), jsonl: Iterable[str] = (), tfds_name: str = "",
              tfds_data_dir: str | None = None, tfds_split: str = "train", text_field: str = "text") -> Iterator[str]:
    """The documents of a source named on a command line (see tools/prepare_data.py)."""
    if source == "stdlib":
        return stdlib_documents()
    if source == "files":
        if not globs:
            raise ValueError("--source=files needs --glob.")
        return file_documents(globs)
    if source == "jsonl":
        if not jsonl:
            raise ValueError("--source=jsonl needs --jsonl.")
        return jsonl_documents(jsonl, text_field)
    if source == "tfds":
        if not tfds_name:
            raise ValueError("--source=tfds needs --tfds_name.")
        return tfds_documents(tfds_name, tfds_data_dir, tfds_split, text_field)
    raise ValueError(f"Unknown source {source!r}; expected one of {SOURCES}.")
