"""The passage store: (id, doc_id, title, text) rows in an Arrow IPC file, written in batches, read memory-mapped."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from rag.retrieval.passages import PassageRecord

SCHEMA = pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string())])


class StoreWriter:
    """Stream passages to an Arrow IPC file; only one batch is ever held in memory."""

    def __init__(self, path: str | Path, batch_rows: int = 10_000):
        self.path = Path(path)
        self.batch_rows = batch_rows
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SCHEMA)
        self._rows: list[PassageRecord] = []
        self.count = 0

    def add(self, passages: Iterable[PassageRecord]) -> None:
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
    """Memory-mapped read access over one or more segment files (rows concatenated in order): opening reads only
    the file footers; rows are paged in when asked for."""

    def __init__(self, paths: str | Path | list[Path]):
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        tables = []
        for path in paths:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()  # zero-copy over the memory map
            if table.schema.names[: len(SCHEMA)] != SCHEMA.names:
                raise ValueError(f"{path}: not a passage store (columns {table.schema.names})")
            tables.append(table)
        self.paths = paths
        self.table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, positions: Sequence[int] | np.ndarray) -> list[PassageRecord | None]:
        """Passages at the given row positions; a negative position (a missing hit) gives None."""
        positions = np.asarray(positions, dtype=np.int64).ravel()
        valid = positions >= 0
        got = self.table.take(pa.array(positions[valid])).to_pylist()
        it = iter(got)
        return [PassageRecord(**next(it)) if ok else None for ok in valid]

    def column(self, name: str, start: int = 0, stop: int | None = None) -> list:
        stop = len(self) if stop is None else stop
        return self.table.column(name).slice(start, stop - start).to_pylist()


class SegmentedVectors:
    """Row-wise concatenation of memory-mapped (N_i, D) arrays, read like one (N, D) array by row indices."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])  # (S + 1,)
        self.shape = (int(self.offsets[-1]), parts[0].shape[1])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        seg = np.searchsorted(self.offsets, rows, side="right") - 1  # (n,) segment of each row
        for s in np.unique(seg):
            hit = seg == s
            out[hit] = self.parts[s][rows[hit] - self.offsets[s]]
        return out

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate([np.asarray(p) for p in self.parts])
        return whole if dtype is None else whole.astype(dtype)
