"""Documents of JSONL corpora for the quality filter: (id, text, record), in file then line order.

A document's id is its record's id field when it has one, else a hash of its text (the same text has the same id
wherever it is). Patterns are expanded like a shell glob (sorted), so `--corpus='web/*.jsonl'` reads every file.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def expand(patterns: str | Iterable[str], flag: str = "--corpus") -> list[Path]:
    patterns = [patterns] if isinstance(patterns, str | os.PathLike) else list(patterns)
    paths = []
    for p in patterns:
        found = sorted(glob.glob(os.path.expanduser(str(p)), recursive=True))
        if not found:
            raise FileNotFoundError(f"{flag}={p} matches no file.")
        paths += [Path(f) for f in found if Path(f).is_file()]
    return paths


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def jsonl_records(path: str | os.PathLike, field: str, fix: str) -> Iterator[tuple[int, dict, str]]:
    """(line number, record, record[field]) of every non-blank line of one JSONL file; a line that is not a JSON
    object with a string `field` is a ValueError naming path:line and `fix` (the flag that names the field)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[field]
                if not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: not a JSON object with a string field {field!r}; {fix}.") from None
            yield lineno, record, text


def read_documents(patterns: str | Iterable[str], text_field: str = "text", id_field: str = "id",
                   flag: str = "--corpus") -> Iterator[tuple[str, str, dict]]:
    """(id, text, record) of every line of the JSONL files; a line that is not such a record is an error naming
    file:line."""
    for path in expand(patterns, flag):
        for _, record, text in jsonl_records(path, text_field, "pass --text_field"):
            yield str(record[id_field]) if id_field in record else text_id(text), text, record


def sample_documents(docs: Iterable[tuple[str, str, dict]], k: int, seed: int) -> list[tuple[str, str, dict]]:
    """A uniform random sample of k documents, the same whatever the corpus's order or split into files: the k
    with the smallest hash of (seed, id) (bottom-k sampling, one pass, memory O(k)), sorted by that hash."""
    def key(doc_id: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")

    heap: list[tuple[int, str, str, dict]] = []  # max-heap by negated key
    seen: set[str] = set()
    for doc_id, text, record in docs:
        if doc_id in seen:
            continue
        h = key(doc_id)
        if len(heap) < k:
            heapq.heappush(heap, (-h, doc_id, text, record))
            seen.add(doc_id)
        elif h < -heap[0][0]:
            _, dropped, _, _ = heapq.heapreplace(heap, (-h, doc_id, text, record))
            seen.discard(dropped)
            seen.add(doc_id)
    return [(d, t, r) for _, d, t, r in sorted(heap, key=lambda x: -x[0])]
