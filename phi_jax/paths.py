"""User paths, local or in a bucket (gs://...): one `etils.epath.Path` type, as orbax uses.

A local path is made absolute (and `~` expanded) so that it means the same wherever it is recorded; a URL is kept
as it is (`pathlib.Path("gs://b/x")` would collapse it to the local directory `gs:/b/x`).
"""

from __future__ import annotations

import logging
import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def user_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a gs:// (or other URL) path as given, a local one absolute."""
    if is_url(path):
        _quiet_gcsfs()
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


class _NoBucketTypeNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Could not determine bucket type" not in record.getMessage()


def _quiet_gcsfs() -> None:
    """gcsfs logs "Could not determine bucket type ... falling back" on every call when it cannot ask the storage
    control API (an emulator, or credentials without that permission); the fallback is the ordinary client."""
    logger = logging.getLogger("gcsfs")
    if not any(isinstance(f, _NoBucketTypeNoise) for f in logger.filters):
        logger.addFilter(_NoBucketTypeNoise())
