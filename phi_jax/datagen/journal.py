"""Exactly-once JSONL output for runs that a kill may stop at any moment.

A task's records go to one or more streams (JSONL files: e.g. complete and truncated completions), each record an
object whose first key is its item's "id". Records are buffered and appended in batches, each batch with one write
and an fsync, so a record on disk is whole and durable. On start the journal cuts a torn last line (a write a kill
interrupted: that item was not done), then reads the ids already written: those items are skipped, every other is
done again. So whatever moment a run is killed at, the next run ends with every item exactly once. An exclusive
lock (flock) keeps a second process off the same task's files.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path

_ID = re.compile(rb'^\{"id": "((?:[^"\\]|\\.)*)"')


def write_json(path: Path, obj) -> None:
    """Writes JSON to a temporary name, then renames it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def record_line(record: dict) -> bytes:
    if next(iter(record), None) != "id":
        raise ValueError(f"A journal record's first key must be 'id', got {list(record)[:3]}.")
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def _repair_and_read_ids(path: Path) -> list[str]:
    """Cuts a torn last line (no newline: an interrupted write) and returns the ids of the whole lines, in order."""
    with open(path, "r+b") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    ids = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        m = _ID.match(line)
        if m:
            ids.append(json.loads(b'"' + m.group(1) + b'"'))
            continue
        try:
            ids.append(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{lineno} is not a record with an id: the file was changed by hand; fix or "
                             "remove that line.") from None
    return ids


class Journal:
    """The streams of one task in `directory`: `streams` maps a stream name to its file (relative path)."""

    def __init__(self, directory: str | Path, streams: dict[str, str], lock_name: str, *,
                 batch_records: int = 64, batch_seconds: float = 2.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / f".lock-{lock_name}", "a")  # noqa: SIM115 (held for the journal's life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise FileExistsError(f"Another process is writing {lock_name} in {self.directory}: wait for it or stop "
                                  "it (two runs of the same task would write the same items twice).") from None
        self.paths = {name: self.directory / rel for name, rel in streams.items()}
        self.done: set[str] = set()
        self.counts = dict.fromkeys(streams, 0)
        for name, path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            ids = _repair_and_read_ids(path)
            for i in ids:
                if i in self.done:
                    raise ValueError(f"Item {i} is written twice in {self.directory} (found again in {path}): the "
                                     "output was edited or mixed with another run's; remove the duplicate.")
                self.done.add(i)
            self.counts[name] = len(ids)
        self.resumed = len(self.done)
        self.batch_records, self.batch_seconds = batch_records, batch_seconds
        self._buffers: dict[str, list[bytes]] = {name: [] for name in streams}
        self._buffered = 0
        self._last_flush = time.monotonic()
        self._fds = {name: os.open(path, os.O_WRONLY | os.O_APPEND) for name, path in self.paths.items()}

    def add(self, stream: str, record: dict) -> None:
        if record["id"] in self.done:
            raise ValueError(f"Item {record['id']} was already written: a run must not plan an item twice.")
        self.done.add(record["id"])
        self._buffers[stream].append(record_line(record))
        self.counts[stream] += 1
        self._buffered += 1
        if self._buffered >= self.batch_records or time.monotonic() - self._last_flush >= self.batch_seconds:
            self.flush()

    def flush(self) -> None:
        """Appends every buffered record (one write per stream) and fsyncs: on return they are durable."""
        for name, lines in self._buffers.items():
            if lines:
                data = b"".join(lines)
                view, fd = memoryview(data), self._fds[name]
                while view:  # a regular file takes the whole write; the loop covers a short write anyway
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                lines.clear()
        self._buffered = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
