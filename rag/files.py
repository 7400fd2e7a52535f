"""Writing files without following links: every write goes to a fresh temporary created with O_EXCL | O_NOFOLLOW,
then replaces its target in one rename (a link at the target is replaced, never written through)."""

from __future__ import annotations

import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # what `fresh_temp` names; the sweep removes leftovers


def fresh_temp(final: Path) -> Path:
    """A new empty regular file beside `final` under a random name, created with O_EXCL | O_NOFOLLOW: a link
    planted in the folder under any name is never written through (the trust model of docs/failure-behaviour.md)."""
    while True:
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def writing(final: str | Path):
    """Write `final` through a fresh temporary file that replaces it in one rename once the block ends without an
    error (a link at `final` is replaced, never followed); the temporary goes on an error."""
    final = Path(final)
    tmp = fresh_temp(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def parse_json(text: str | bytes):
    """json.loads whose every failure is a ValueError: a document nested thousands deep makes the parser raise
    RecursionError, which a reader's `except ValueError` would let through as a traceback."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deep") from None


def save_npy(path: Path, array) -> None:
    """np.save through `writing` (a file object: np.save would add ".npy" to the temporary's name)."""
    import numpy as np

    with writing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def open_npy(path: Path, dtype, shape: tuple[int, ...]):
    """A writable memory-mapped .npy of `shape` whose blocks are allocated on disk first: a disk that fills up
    then fails here with ENOSPC (an OSError naming the file), not later with SIGBUS inside a write to the map."""
    import numpy as np

    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        del array
        raise OSError(e.errno, f"{os.strerror(e.errno)}: {size / 2**30:.2f} GiB needed", str(path)) from None
    finally:
        os.close(fd)
    return array


def write_faiss(index, path: Path) -> None:
    """faiss.write_index through `writing`; a failed write (full disk, a size limit) is an OSError naming the file,
    not faiss's RuntimeError."""
    import errno

    import faiss

    with writing(path) as tmp:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as e:
            raise OSError(errno.EIO, f"cannot write the index ({str(e).splitlines()[0][:120]}); is the disk full?",
                          str(path)) from None


def write_json_atomic(path: Path, data: dict) -> None:
    with writing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


