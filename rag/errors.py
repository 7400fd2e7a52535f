"""User errors: one base class, and the one way every CLI reports them (one line, exit 2, no traceback)."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable


class RagError(Exception):
    """A mistake the user can fix (a missing index, a bad config key or value, a malformed input line).

    The message says what was wrong, where (file, line or key) and what to do."""


class ConfigError(RagError, ValueError):
    """A config file or override that does not fit the schema."""


class BadInput(RagError, ValueError):
    """An argument of a public call that is out of range."""


class BadType(RagError, TypeError):
    """An argument of a public call of the wrong type."""


OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space (or write elsewhere) and run the same command again; what was "
                  "already written is kept",
    errno.EDQUOT: "over the disk quota: free space and run the same command again",
    errno.EFBIG: "over the file-size limit (ulimit -f): raise it and run the same command again",
    errno.EROFS: "the folder is read-only: write somewhere else",
    errno.EACCES: "no permission: write somewhere you may, or fix the folder's permissions",
    errno.EPERM: "no permission: write somewhere you may, or fix the folder's permissions",
    errno.ENOTDIR: "a file is where a folder should be: choose another path",
    errno.EEXIST: "a file is where a folder should be: choose another path",
    errno.EISDIR: "a folder is where a file should be: choose another path",
    errno.EIO: "free space if the disk is full, then run the same command again",
}


def describe_os_error(e: OSError) -> str:
    """An OSError as one line: the file, what happened, what to do."""
    where = f"{e.filename}: " if e.filename else ""
    what = e.strerror or (str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
    code = e.errno
    if code is None:  # pyarrow's OSError carries the errno in its text: "... [errno 28] No space left on device"
        import re

        found = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)
        code = int(found[1]) if found else None
    hint = OS_HINTS.get(code)
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body; a `RagError` (or a missing file) is printed as one line and exits 2."""
    try:
        return main()
    except (RagError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a size limit, a read-only folder, a file where a folder should be
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
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
