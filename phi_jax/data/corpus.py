"""Document sources: each yields one str per document, in a deterministic order.

Nothing is dropped silently: a file that is not UTF-8 text (or holds NUL bytes: binary) and a JSONL line that is
not a JSON object with a string text field are counted in a `SkipReport` (recorded in the shards' metadata), or
are an error naming the file (and line): `strict=True` for files, `skip_bad_lines=False` (the default) for lines.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger("phi_jax")


class SkipReport(dict):
    """What a source skipped: counts by kind and the first few examples ("file: why")."""

    KINDS = ("non_utf8_files", "binary_files", "bad_lines")
    MAX_EXAMPLES = 5

    def __init__(self):
        super().__init__({k: 0 for k in self.KINDS}, examples=[])

    def add(self, kind: str, where: str) -> None:
        self[kind] += 1
        if len(self["examples"]) < self.MAX_EXAMPLES:
            self["examples"].append(where)
            log.warning("skipped %s", where)

    def summary(self) -> str:
        counts = ", ".join(f"{self[k]} {k.replace('_', ' ')}" for k in self.KINDS if self[k])
        return f"skipped {counts}, e.g. {'; '.join(self['examples'])}" if counts else "nothing skipped"


def _read_text(path: Path, report: SkipReport | None, strict: bool) -> str | None:
    """The file decoded as UTF-8 with its newlines untouched; None (counted) if it is binary or not UTF-8."""
    data = path.read_bytes()
    if (nul := data.find(b"\0")) >= 0:
        kind, why = "binary_files", f"{path}: a NUL byte at offset {nul}"
    else:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            kind, why = "non_utf8_files", f"{path}: not UTF-8 at byte {e.start}"
    if strict:
        raise ValueError(f"{why} (binary or not UTF-8 text). Remove it from the glob, or drop --strict to skip and "
                         "count such files.")
    if report is not None:
        report.add(kind, why)
    else:
        log.warning("skipped %s", why)
    return None


def stdlib_files() -> list[Path]:
    """The Python standard library's .py files (no site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents(report: SkipReport | None = None) -> Iterator[str]:
    """Every UTF-8 standard-library source file, one document each: an embedded corpus of ~31 MB."""
    for path in stdlib_files():
        if (text := _read_text(path, report, strict=False)) is not None:
            yield text


def file_documents(globs: str | Iterable[str], report: SkipReport | None = None,
                   strict: bool = False) -> Iterator[str]:
    """Files matching the glob patterns (`**` recurses), sorted, each once; binary and non-UTF-8 files are counted
    in `report` and skipped, or are an error with `strict`."""
    globs = [globs] if isinstance(globs, str) else list(globs)
    paths = sorted({Path(p) for g in globs for p in glob.glob(os.path.expanduser(g), recursive=True)})
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise FileNotFoundError(f"No files match {globs}.")
    for path in paths:
        if (text := _read_text(path, report, strict)) is not None:
            yield text


def jsonl_documents(paths: str | Iterable[str], text_field: str = "text", report: SkipReport | None = None,
                    skip_bad_lines: bool = False) -> Iterator[str]:
    """The `text_field` of every line of JSON Lines files, in file then line order.

    A line that is not UTF-8, not JSON, not an object, or has no text field or a text that is not a string is an
    error naming file:line; with `skip_bad_lines` it is skipped and counted in `report` (a wrong --text_field then
    skips every line, and the preparation stops with "0 documents ... N bad lines skipped").
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                    if not isinstance(record, dict):
                        raise ValueError(f"a JSON {type(record).__name__}, not an object")
                    if text_field not in record:
                        raise ValueError(f"no field {text_field!r} (its fields: {sorted(record)[:10]}; the text "
                                         "field is named by --text_field)")
                    if not isinstance(record[text_field], str):
                        raise ValueError(f"field {text_field!r} is {type(record[text_field]).__name__}, not a string")
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    where = f"{path}:{lineno}: {e}"
                    if not skip_bad_lines:
                        raise ValueError(f"{where}. Fix the line, or pass --skip_bad_lines to skip and count such "
                                         "lines.") from None
                    if report is not None:
                        report.add("bad_lines", where)
                    continue
                yield record[text_field]


def tfds_documents(name: str, data_dir: str | None = None, split: str = "train",
                   text_field: str = "text") -> Iterator[str]:
    """A TFDS dataset's text field read through `tfds.data_source` (array_record files; TensorFlow not needed)."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, data_dir=data_dir, split=split)
    for i in range(len(source)):
        record = source[i]
        if text_field not in record:
            raise ValueError(f"TFDS {name}[{split}] record {i} has no field {text_field!r} (fields: {sorted(record)}); "
                             "pass --text_field.")
        text = record[text_field]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


SOURCES = ("stdlib", "files", "jsonl", "tfds")


def documents(source: str, *, globs: Iterable[str] = (), jsonl: Iterable[str] = (), tfds_name: str = "",
              tfds_data_dir: str | None = None, tfds_split: str = "train", text_field: str = "text",
              report: SkipReport | None = None, strict: bool = False,
              skip_bad_lines: bool = False) -> Iterator[str]:
    """The documents of a source named on a command line (see tools/prepare_data.py); skips go to `report`."""
    if source == "stdlib":
        return stdlib_documents(report)
    if source == "files":
        if not globs:
            raise ValueError("--source=files needs --glob.")
        return file_documents(globs, report, strict)
    if source == "jsonl":
        if not jsonl:
            raise ValueError("--source=jsonl needs --jsonl.")
        return jsonl_documents(jsonl, text_field, report, skip_bad_lines)
    if source == "tfds":
        if not tfds_name:
            raise ValueError("--source=tfds needs --tfds_name.")
        return tfds_documents(tfds_name, tfds_data_dir, tfds_split, text_field)
    raise ValueError(f"Unknown source {source!r}; expected one of {SOURCES}.")
