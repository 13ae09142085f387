"""Command-line entry points: CPU hosts' malloc on huge pages first, and a user's mistake as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


def run(main: Callable[[], object]) -> None:
    """Calls `main()`; a bad path, an existing output, an invalid value or a failed write exits with status 1 and its
    message.

    Before anything else, a CPU host's process restarts once with glibc's malloc on huge pages (host_memory.py)."""
    from phi_jax.host_memory import ensure_huge_pages

    ensure_huge_pages()
    try:
        main()
    except (*USER_ERRORS, OSError) as e:  # OSError: disk full, a size limit, permissions (outputs are atomic)
        sys.exit(f"error: {e}")
