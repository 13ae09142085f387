"""A GCS JSON API server on 127.0.0.1 (gcp-storage-emulator) and the environment that points every client at it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

BUCKET = "bkt"


def emulator_env(port: int) -> dict[str, str]:
    """google-cloud-storage / gcsfs (etils.epath), tensorstore (orbax) and google-cloud-cpp (array_record)."""
    url = f"http://127.0.0.1:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url, "GOOGLE_CLOUD_PROJECT": "test"}


@contextmanager
def gcs_emulator():
    """Starts the emulator on a free port with an in-memory bucket `bkt`; yields its environment."""
    from tools.launch_local import free_port

    port = free_port()
    exe = shutil.which("gcp-storage-emulator") or os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen([exe, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
                             f"--default-bucket={BUCKET}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the GCS emulator did not start"
                time.sleep(0.2)
        yield emulator_env(port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
