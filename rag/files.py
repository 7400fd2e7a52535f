"""Files and the paths configs name. Writing never follows links: every write goes to a fresh temporary created
with O_EXCL | O_NOFOLLOW, then replaces its target in one rename (a link at the target is replaced, never written
through). A configured path expands ${RAG_CACHE}; a folder of weights with a pickle file in it is refused."""

from __future__ import annotations

import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

from rag.errors import ConfigError

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



def map_rows(path: Path):
    """A read-only memory map of a 2-d .npy for random row reads (the exact re-rank's candidates): the kernel is
    told so (MADV_RANDOM), else every 1.5 kB row it faults in drags its readahead window (128 kB or more) along,
    and a search over a folder larger than the page cache reads a hundred times what it uses."""
    import mmap

    import numpy as np

    array = np.load(path, mmap_mode="r")
    if hasattr(mmap, "MADV_RANDOM") and isinstance(getattr(array, "_mmap", None), mmap.mmap):
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array


def create_npy(path: Path, dtype, shape: tuple[int, ...]) -> None:
    """An empty .npy of `shape` with its blocks allocated on disk (see `open_npy`), to be filled by `NpyRows`."""
    open_npy(path, dtype, shape)  # the map it returns is closed as it goes


class NpyRows:
    """Rows of a 2-d .npy read and written with plain file I/O, not a memory map: a pass over 32 GB of vectors
    leaves them to the kernel's page cache instead of the process's resident set (the touched pages of a map count
    as the process's memory). Reads take a slice or sorted row positions, as a memory map would."""

    def __init__(self, path: Path, writable: bool = False):
        import numpy as np

        header = np.load(path, mmap_mode="r")
        if header.ndim != 2:
            raise ValueError(f"{path}: shape {header.shape}, not (rows, dim)")
        self.path, self.shape, self.dtype, self.offset = Path(path), header.shape, header.dtype, header.offset
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        del header
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)
            self.fd = None

    def __getitem__(self, rows):
        import numpy as np

        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                raise IndexError("NpyRows reads contiguous slices only")
            return self._read(start, max(start, stop))
        rows = np.asarray(rows, np.int64)
        return np.stack([self._read(int(i), int(i) + 1)[0] for i in rows]) if len(rows) else \
            np.zeros((0, self.shape[1]), self.dtype)

    def _read(self, start: int, stop: int):
        import numpy as np

        size = (stop - start) * self.row_bytes
        data = os.pread(self.fd, size, self.offset + start * self.row_bytes)
        if len(data) != size:
            raise OSError(f"{self.path}: short read at row {start} (the file is truncated)")
        return np.frombuffer(data, self.dtype).reshape(stop - start, self.shape[1])

    def write(self, start: int, block) -> None:
        """Rows start.. of the file from (n, dim) `block` (cast to the file's dtype)."""
        import numpy as np

        view = memoryview(np.ascontiguousarray(block, self.dtype)).cast("B")
        offset = self.offset + start * self.row_bytes
        while len(view):
            wrote = os.pwrite(self.fd, view, offset)
            view, offset = view[wrote:], offset + wrote

    def sync(self) -> None:
        os.fsync(self.fd)


def cache_dir() -> Path:
    """The one cache root: converted models under models/, the demo indexes under indexes/ ($RAG_CACHE moves both)."""
    return Path(os.environ.get("RAG_CACHE") or "~/.cache/rag").expanduser()


def expand_path(path: str | Path) -> Path:
    """A configured path with ${RAG_CACHE} (the cache root) and ~ expanded."""
    return Path(str(path).replace("${RAG_CACHE}", str(cache_dir()))).expanduser()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickle(folder: Path, key: str) -> None:
    """A local model or adapter folder is read from safetensors only: a pickle file (pytorch_model.bin,
    adapter_model.bin) can run code when loaded, and transformers or peft would fall back to it."""
    if not folder.is_dir():
        return
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise ConfigError(f"{key}: {folder / found[0]} is a pickle file, which can run code when loaded; this project "
                          "reads safetensors only: convert it where you trust it (load, then save_pretrained "
                          "writes safetensors) and remove the pickle file")
