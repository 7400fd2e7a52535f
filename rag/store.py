"""The passage store: (id, doc_id, title, text) rows in an Arrow IPC file, written in batches, read memory-mapped."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from rag.passages import Passage

SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())])


class StoreWriter:
    """Stream passages to an Arrow IPC file; only one batch is ever held in memory."""

    def __init__(self, path: str | Path, batch_rows: int = 10_000):
        self.path = Path(path)
        self.batch_rows = batch_rows
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._rows: list[Passage] = []
        self.count = 0

    def add(self, passages: Iterable[Passage]) -> None:
        for p in passages:
            self._rows.append(p)
            if len(self._rows) >= self.batch_rows:
                self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        cols = [[getattr(p, name) for p in self._rows] for name in SCHEMA.names]
        self._writer.write_batch(pa.record_batch(cols, schema=SCHEMA))
        self.count += len(self._rows)
        self._rows = []

    def close(self) -> int:
        self._flush()
        self._writer.close()
        self._sink.close()
        return self.count

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._writer.close()
            self._sink.close()


class PassageStore:
    """Memory-mapped read access: opening reads only the file footer; rows are paged in when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._source = pa.memory_map(str(self.path), "r")
        self.table = pa.ipc.open_file(self._source).read_all()  # zero-copy over the memory map
        if self.table.schema.names[: len(SCHEMA)] != SCHEMA.names:
            raise ValueError(f"{self.path}: not a passage store (columns {self.table.schema.names})")

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, positions: Sequence[int] | np.ndarray) -> list[Passage | None]:
        """Passages at the given row positions; a negative position (a missing hit) gives None."""
        positions = np.asarray(positions, dtype=np.int64).ravel()
        valid = positions >= 0
        got = self.table.take(pa.array(positions[valid])).to_pylist()
        it = iter(got)
        return [Passage(**next(it)) if ok else None for ok in valid]

    def column(self, name: str, start: int = 0, stop: int | None = None) -> list:
        stop = len(self) if stop is None else stop
        return self.table.column(name).slice(start, stop - start).to_pylist()
