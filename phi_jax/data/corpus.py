"""Document sources: each yields one str per document, in a deterministic order.

Nothing is dropped silently: a file that is not UTF-8 text (or holds NUL bytes: binary) and a JSONL line that is
not a JSON object with a string text field are counted in a `SkipReport` (recorded in the shards' metadata), or
are an error naming the file (and line): `strict=True` for files, `skip_bad_lines=False` (the default) for lines.

The sources of files, JSON Lines and TFDS are `Source`s: besides yielding documents, they list their *units* (a file,
a non-blank line, a record index) cheaply and in order before anything is decoded, so that a preparation task
(phi_jax/data/prepare.py) decodes only the units of its own pieces; a unit that turns out bad is a hole in its piece.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

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


class Source:
    """Documents whose units can be listed, in order, without reading or decoding them: `units()` yields
    (unit, size) (the size, or 0, fingerprints the listing: every task of a preparation must list the same);
    `decode(unit)` is the unit's document, or None when it is bad (counted in `report`, or an error). Iterating a
    Source yields its good documents, like the generators it replaces."""

    def __init__(self, report: SkipReport | None = None):
        self.report = report
        self._docs: Iterator[str] | None = None

    def units(self) -> Iterator[tuple[Any, int]]:
        raise NotImplementedError

    def decode(self, unit: Any) -> str | None:
        raise NotImplementedError

    def _documents(self) -> Iterator[str]:
        for unit, _ in self.units():
            if (text := self.decode(unit)) is not None:
                yield text

    def __iter__(self) -> Source:
        return self

    def __next__(self) -> str:
        if self._docs is None:
            self._docs = self._documents()
        return next(self._docs)


class FileSource(Source):
    """One document per file, in the order given; a file is a unit, read only when decoded."""

    def __init__(self, paths: Callable[[], list[Path]], report: SkipReport | None = None, strict: bool = False):
        super().__init__(report)
        self._paths, self._list, self.strict = paths, None, strict

    def units(self) -> Iterator[tuple[Path, int]]:
        if self._list is None:
            self._list = self._paths()
        for path in self._list:
            yield path, path.stat().st_size

    def decode(self, unit: Path) -> str | None:
        return _read_text(unit, self.report, self.strict)


def stdlib_documents(report: SkipReport | None = None) -> FileSource:
    """Every UTF-8 standard-library source file, one document each: an embedded corpus of ~31 MB."""
    return FileSource(stdlib_files, report)


def file_documents(globs: str | Iterable[str], report: SkipReport | None = None,
                   strict: bool = False) -> FileSource:
    """Files matching the glob patterns (`**` recurses), sorted, each once; binary and non-UTF-8 files are counted
    in `report` and skipped, or are an error with `strict`."""
    globs = [globs] if isinstance(globs, str) else list(globs)

    def paths() -> list[Path]:
        found = sorted({Path(p) for g in globs for p in glob.glob(os.path.expanduser(g), recursive=True)})
        if not (found := [p for p in found if p.is_file()]):
            raise FileNotFoundError(f"No files match {globs}.")
        return found

    return FileSource(paths, report, strict)


class JsonlSource(Source):
    """The `text_field` of every non-blank line of JSON Lines files; a line is a unit, split off by its newline
    and parsed only when decoded."""

    def __init__(self, paths: list, text_field: str, report: SkipReport | None, skip_bad_lines: bool):
        super().__init__(report)
        self.paths, self.text_field, self.skip_bad_lines = paths, text_field, skip_bad_lines

    def units(self) -> Iterator[tuple[tuple[Any, int, bytes], int]]:
        for path in self.paths:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if raw.strip():
                        yield (path, lineno, raw), len(raw)

    def decode(self, unit: tuple[Any, int, bytes]) -> str | None:
        path, lineno, raw = unit
        text_field = self.text_field
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
            if not self.skip_bad_lines:
                raise ValueError(f"{where}. Fix the line, or pass --skip_bad_lines to skip and count such "
                                 "lines.") from None
            if self.report is not None:
                self.report.add("bad_lines", where)
            return None
        return record[text_field]


def jsonl_documents(paths: str | Iterable[str], text_field: str = "text", report: SkipReport | None = None,
                    skip_bad_lines: bool = False) -> JsonlSource:
    """The `text_field` of every line of JSON Lines files, in file then line order.

    A line that is not UTF-8, not JSON, not an object, or has no text field or a text that is not a string is an
    error naming file:line; with `skip_bad_lines` it is skipped and counted in `report` (a wrong --text_field then
    skips every line, and the preparation stops with "0 documents ... N bad lines skipped").
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    return JsonlSource(paths, text_field, report, skip_bad_lines)


class TfdsSource(Source):
    """A TFDS dataset's text field through `tfds.data_source` (random access): a record index is a unit."""

    def __init__(self, name: str, data_dir: str | None, split: str, text_field: str):
        super().__init__(None)
        self.name, self.data_dir, self.split, self.text_field = name, data_dir, split, text_field
        self._source = None

    def units(self) -> Iterator[tuple[int, int]]:
        import tensorflow_datasets as tfds

        if self._source is None:
            self._source = tfds.data_source(self.name, data_dir=self.data_dir, split=self.split)
        for i in range(len(self._source)):
            yield i, 0

    def decode(self, unit: int) -> str:
        record = self._source[unit]
        if self.text_field not in record:
            raise ValueError(f"TFDS {self.name}[{self.split}] record {unit} has no field {self.text_field!r} "
                             f"(fields: {sorted(record)}); pass --text_field.")
        text = record[self.text_field]
        return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def tfds_documents(name: str, data_dir: str | None = None, split: str = "train",
                   text_field: str = "text") -> TfdsSource:
    """A TFDS dataset's text field read through `tfds.data_source` (array_record files; TensorFlow not needed)."""
    return TfdsSource(name, data_dir, split, text_field)


SOURCES = ("stdlib", "files", "jsonl", "tfds")


def documents(source: str, *, globs: Iterable[str] = (), jsonl: Iterable[str] = (), tfds_name: str = "",
              tfds_data_dir: str | None = None, tfds_split: str = "train", text_field: str = "text",
              report: SkipReport | None = None, strict: bool = False,
              skip_bad_lines: bool = False) -> Source:
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
