"""One trainer per workdir: `<workdir>/lock.json`, created atomically, names its holder and carries a heartbeat.

The holder (process 0 of a run) refreshes the heartbeat every `refresh_s` seconds from a background thread and removes
the file when the run ends, however it ends short of SIGKILL. A second trainer finds the file and stops with an error
naming the holder. A lock left by a killed run is stale, and taken over with a warning, when its process is gone
(same host) or its heartbeat is older than `stale_after_s` (any host; `PHI_JAX_LOCK_STALE_SECONDS`, default 300).

Atomic creation: locally a fully written temporary file is hard-linked to lock.json (link fails if it exists); on
gs:// the object is written with the precondition `if_generation_match=0` (google-cloud-storage), which GCS grants to
one writer only. A takeover first removes the stale lock conditionally (local: rename, which only one process wins;
gs://: delete with `if_generation_match` of the stale object) and then creates its own, so two takers cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from etils import epath

log = logging.getLogger("phi_jax")

LOCK_NAME = "lock.json"


class WorkdirLockedError(FileExistsError):
    """Another live trainer holds the workdir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _LocalStore:
    def __init__(self, path: epath.Path):
        self.path = path

    def create(self, text: str) -> bool:
        tmp = self.path.parent / f".{LOCK_NAME}.{uuid.uuid4().hex}"
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)  # fails if the lock exists: creation and content in one step
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def read(self) -> tuple[dict, object] | None:
        try:
            holder = _parse(self.path.read_bytes(), self.path.stat().mtime)
        except FileNotFoundError:
            return None
        return holder, holder.get("token")

    def replace(self, text: str, _version) -> object:
        tmp = self.path.parent / f".{LOCK_NAME}.{uuid.uuid4().hex}"
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def remove(self, version) -> bool:
        """Removes the lock if it is still the one holding token `version`."""
        moved = self.path.parent / f".{LOCK_NAME}.removed.{uuid.uuid4().hex}"
        try:  # a rename: of several racing processes, one moves the file
            os.rename(self.path, moved)
        except FileNotFoundError:
            return False
        if _parse(moved.read_bytes(), 0).get("token") != version:  # a new holder's lock: put it back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
            moved.unlink()
            return False
        moved.unlink()
        return True


class _GcsStore:
    """Generation preconditions make create, replace and remove atomic compare-and-swap operations."""

    def __init__(self, path: epath.Path):
        from google.api_core import exceptions
        from google.cloud import storage

        self.exceptions = exceptions
        bucket, _, name = str(path).removeprefix("gs://").partition("/")
        self.blob_name = name
        self.bucket = storage.Client().bucket(bucket)

    def _blob(self):
        return self.bucket.blob(self.blob_name)

    def create(self, text: str) -> bool:
        try:
            self._blob().upload_from_string(text, content_type="application/json", if_generation_match=0)
            return True
        except self.exceptions.PreconditionFailed:
            return False

    def read(self) -> tuple[dict, object] | None:
        # Content and generation from one response (x-goog-generation): reading the metadata first and then
        # downloading that generation lost a race with a taker that deleted the object in between.
        blob = self._blob()
        try:
            data = blob.download_as_bytes()
        except self.exceptions.NotFound:
            return None
        return _parse(data, blob.updated.timestamp() if blob.updated else 0.0), blob.generation

    def replace(self, text: str, version) -> object:
        blob = self._blob()
        blob.upload_from_string(text, content_type="application/json", if_generation_match=version)
        return blob.generation

    def remove(self, version) -> bool:
        try:
            self._blob().delete(if_generation_match=version)
            return True
        except (self.exceptions.PreconditionFailed, self.exceptions.NotFound):
            return False


def _parse(data: bytes, written: float) -> dict:
    """A lock's holder. A lock file that is not a JSON object (damaged: locks are written whole) has no holder to
    ask; it stands for one whose heartbeat is the file's modification time, so it goes stale like any other."""
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return {"damaged": f"not JSON: {e}", "heartbeat": written}
    if not isinstance(holder, dict):
        return {"damaged": f"a JSON {type(holder).__name__}, not an object", "heartbeat": written}
    if not isinstance(holder.get("heartbeat", 0), int | float) or not isinstance(holder.get("pid", -1), int):
        return {"damaged": "its heartbeat or pid is not a number", "heartbeat": written}
    return holder


def _store(path: epath.Path):
    if str(path).startswith("gs://"):
        return _GcsStore(path)
    if "://" in str(path):
        raise ValueError(f"The workdir lock supports local paths and gs:// only, not {path}.")
    return _LocalStore(path)


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for one trainer (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike, *, refresh_s: float = 30.0, stale_after_s: float | None = None):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.refresh_s = refresh_s
        self.stale_after_s = float(os.environ.get("PHI_JAX_LOCK_STALE_SECONDS", 300)) if stale_after_s is None \
            else stale_after_s
        self.token = uuid.uuid4().hex
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.now(UTC).isoformat(timespec="seconds"), "token": self.token}
        self._store = _store(self.path)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _text(self) -> str:
        return json.dumps({**self.owner, "heartbeat": time.time()})

    def _stale_reason(self, holder: dict) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} is gone"
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def acquire(self) -> None:
        for _ in range(5):  # a lost race re-reads the lock that won it
            found = self._store.read()
            if found is None:  # read back: a store that ignored the precondition (an emulator) shows who won
                if self._store.create(self._text()) and (mine := self._store.read()) and \
                        mine[0].get("token") == self.token:
                    break
                continue
            holder, version = found
            if (reason := self._stale_reason(holder)) is None and "damaged" in holder:
                raise WorkdirLockedError(
                    f"{self.path} is damaged ({holder['damaged']}) and was written "
                    f"{time.time() - holder['heartbeat']:.0f} s ago, so a trainer may hold it. If none uses "
                    f"{self.path.parent}, delete {self.path}; a damaged lock is taken over once stale "
                    f"({self.stale_after_s:.0f} s).")
            if reason is None:
                raise WorkdirLockedError(
                    f"{self.path.parent} is in use by another trainer (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, started {holder.get('started')}); stop it or use another --workdir. If "
                    f"that run is dead, the lock is taken over once stale ({self.stale_after_s:.0f} s), or delete "
                    f"{self.path}.")
            if "damaged" in holder:
                log.warning("taking over the damaged workdir lock %s (%s): %s", self.path, holder["damaged"], reason)
            else:
                log.warning("taking over the stale workdir lock of host %s pid %s (started %s): %s",
                            holder.get("host"), holder.get("pid"), holder.get("started"), reason)
            self._store.remove(version)
        else:
            raise WorkdirLockedError(f"Could not acquire {self.path}: other trainers keep taking it.")
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
        self._thread.start()
        log.info("holding the workdir lock %s", self.path)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                found = self._store.read()
                if found is None or found[0].get("token") != self.token:
                    log.error("the workdir lock %s was taken over by another trainer (%s); two runs may now write "
                              "to this workdir", self.path, found and {k: found[0].get(k) for k in ("host", "pid")})
                    return
                self._store.replace(self._text(), found[1])
            except Exception as e:  # a transient storage error: the next refresh retries
                log.warning("refreshing the workdir lock %s failed: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        found = self._store.read()
        if found is not None and found[0].get("token") == self.token:
            self._store.remove(found[1])

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
