"""A GCS JSON API server on 127.0.0.1 (gcp-storage-emulator, patched to keep GCS's generation contract) and the
environment that points every client at it.

gcp-storage-emulator (2026.7.19) breaks two promises of GCS that tensorstore (orbax's checkpoint I/O) relies on:
- a media download (`alt=media`) carries no `x-goog-generation` header, so tensorstore records generation 0 for what it
  read; its next write conditioned on that generation (OCDBT's manifest update) is refused before any request with
  "Malformed StorageGeneration" (tensorstore/kvstore/gcs/validate.cc: a generation must be > 0). Whether a checkpoint
  write hit this depended on whether tensorstore had re-read the manifest, so a bucket run failed 1 time in 3-5.
- it ignores the preconditions `ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch` and
  `ifMetagenerationNotMatch`, so compare-and-swap writes (OCDBT's manifest, the workdir lock) always "won".

`python tests/gcs_emulator.py PORT` runs the emulator with its object handlers wrapped to do both as GCS does
(https://cloud.google.com/storage/docs/request-preconditions): reads send `x-goog-generation` and
`x-goog-metageneration`; a precondition that fails is 412 (304 for a read's `...NotMatch`), checked and applied under
one lock, so of racing writers with `ifGenerationMatch=0` exactly one creates the object. It also honours a listing's
`startOffset`/`endOffset`, which tensorstore's List (and DeleteRange) use to bound a key range: the emulator ignored
them and listed the whole bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from http import HTTPStatus

BUCKET = "bkt"


def emulator_env(port: int) -> dict[str, str]:
    """google-cloud-storage / gcsfs (etils.epath), tensorstore (orbax) and google-cloud-cpp (array_record)."""
    url = f"http://127.0.0.1:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url, "GOOGLE_CLOUD_PROJECT": "test"}


@contextmanager
def gcs_emulator():
    """Starts the (patched) emulator on a free port with an in-memory bucket `bkt`; yields its environment."""
    from tools.launch_local import free_port

    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:  # the health check answers once the handlers are patched and the server listens
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise AssertionError(f"the GCS emulator did not start:\n{log.read()[-3000:]}") from None
                    time.sleep(0.2)
            yield emulator_env(port)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# ---- the server side: runs in the emulator's own process (`python tests/gcs_emulator.py PORT`) ----

_CONDITIONS = {"ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch"}


def failed_precondition(query: dict[str, list[str]], obj: dict | None, *, write: bool) -> HTTPStatus | None:
    """GCS's answer to a request whose preconditions do not hold on the live object `obj` (None: there is none),
    or None when they all hold. `ifGenerationMatch=0` means "only if there is no live object"."""
    gen = int(obj["generation"]) if obj else 0
    meta = int(obj["metageneration"]) if obj else None
    not_modified = HTTPStatus.PRECONDITION_FAILED if write else HTTPStatus.NOT_MODIFIED
    for key in _CONDITIONS & query.keys():
        want = int(query[key][0])
        if key == "ifGenerationMatch" and gen != want:
            return HTTPStatus.PRECONDITION_FAILED
        if key == "ifGenerationNotMatch" and gen == want:
            return not_modified
        if key == "ifMetagenerationMatch" and meta != want:
            return HTTPStatus.PRECONDITION_FAILED
        if key == "ifMetagenerationNotMatch" and meta == want:
            return not_modified
    return None


def _patch_handlers() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    lock = threading.Lock()  # the server is single-threaded today; the lock keeps check-then-write atomic regardless

    def live(storage, bucket, name):
        if bucket is None or name is None:
            return None
        try:
            return storage.get_file_obj(bucket, name)
        except NotFound:
            return None

    def the_object(request, storage):
        return request.params["bucket_name"], request.params["object_id"]

    def the_destination(request, storage):
        p = request.params
        return p.get("dest_bucket_name", p["bucket_name"]), p.get("dest_object_id", p.get("object_id"))

    def the_upload(request, storage):  # insert: media / multipart / resumable start
        name = request.query.get("name", [None])[0]
        if name is None and isinstance(request.data, dict):
            name = (request.data.get("meta") or request.data).get("name")
        return request.params["bucket_name"], name

    def the_resumable(request, storage):
        try:
            obj = storage.get_resumable_file_obj(request.query["upload_id"][0])
        except (NotFound, KeyError):
            return None, None
        return obj["bucket"], obj["name"]

    def guarded(handler, target, *, write):
        def run(request, response, storage, *args, **kwargs):
            with lock:
                obj = live(storage, *target(request, storage))
                if obj is not None or write:  # a read of a missing object is the handler's 404
                    status = failed_precondition(request.query, obj, write=write)
                    if status is not None:
                        response.status = status
                        if status == HTTPStatus.PRECONDITION_FAILED:
                            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions "
                                                     "you specified did not hold.",
                                                     "errors": [{"reason": "conditionNotMet"}]}})
                        return None
                result = handler(request, response, storage, *args, **kwargs)
                if not write and obj is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                    response["x-goog-generation"] = str(obj["generation"])
                    response["x-goog-metageneration"] = str(obj["metageneration"])
                return result
        return run

    def ls(request, response, storage, *args, **kwargs):
        objects.ls(request, response, storage, *args, **kwargs)
        start, end = (request.query.get(k, [""])[0] for k in ("startOffset", "endOffset"))
        if (start or end) and response.status == HTTPStatus.OK:
            listing = json.loads(response._content)

            def within(name):
                return start <= name and (not end or name < end)

            listing["items"] = [o for o in listing.get("items") or [] if within(o["name"])]
            listing["prefixes"] = [p for p in listing.get("prefixes") or [] if within(p)]
            response.json(listing)

    wrapped = {
        objects.ls: ls,
        objects.get: guarded(objects.get, the_object, write=False),
        objects.download: guarded(objects.download, the_object, write=False),
        objects.insert: guarded(objects.insert, the_upload, write=True),
        objects.upload_partial: guarded(objects.upload_partial, the_resumable, write=True),
        objects.delete: guarded(objects.delete, the_object, write=True),
        objects.patch: guarded(objects.patch, the_object, write=True),
        objects.copy: guarded(objects.copy, the_destination, write=True),
        objects.rewrite: guarded(objects.rewrite, the_destination, write=True),
        objects.compose: guarded(objects.compose, the_destination, write=True),
    }
    for _, methods in server.HANDLERS:
        for method, handler in methods.items():
            methods[method] = wrapped.get(handler, handler)
    objects.insert = wrapped[objects.insert]  # the router's fallback for uploads posted without /upload


def main(port: int) -> None:
    from gcp_storage_emulator.server import create_server

    _patch_handlers()
    create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET).run()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(int(sys.argv[1]))
