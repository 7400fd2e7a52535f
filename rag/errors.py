"""User errors: one base class, and the one way every CLI reports them (one line, exit 2, no traceback)."""

from __future__ import annotations

import logging
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


def quiet_logging(level: int = logging.INFO) -> None:
    """One line per stage from this project's loggers, warnings only from the libraries, no library bars."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("rag", "index_builder", "eval"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines name modules it did not find
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in an answer
