"""User errors: one base class, and the one way every CLI reports them (one line, exit 2, no traceback)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class RagError(Exception):
    """A mistake the user can fix (a missing index, a bad config key or value, a malformed input line).

    The message says what was wrong, where (file, line or key) and what to do."""


class BadInput(RagError, ValueError):
    """An argument of a public call that is out of range."""


class BadType(RagError, TypeError):
    """An argument of a public call of the wrong type."""


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body; a `RagError` (or a missing file) is printed as one line and exits 2."""
    try:
        return main()
    except (RagError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
