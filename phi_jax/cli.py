"""Command-line entry points report a user's mistake as one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError)


def run(main: Callable[[], object]) -> None:
    """Calls `main()`; a bad path, an existing output, an invalid value or a failed write exits with status 1 and its
    message."""
    try:
        main()
    except (*USER_ERRORS, OSError) as e:  # OSError: disk full, a size limit, permissions (outputs are atomic)
        sys.exit(f"error: {e}")
