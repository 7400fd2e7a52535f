"""`index_builder import`: an index folder from passages that already carry their vectors (no encoding).

Sources (corpus.format): a `datasets` folder written by `save_to_disk` (e.g. wiki_dpr: id, text, title,
embeddings), Arrow IPC or Parquet files with an embeddings column, or `npy`: a passages file (jsonl / dpr_tsv) with
`.npy` vector shards beside it. Never pickles. Passage ids and texts are kept as given (no splitting). Nothing
reads the source whole: one streamed pass writes the passage store and puts each vector straight into its row of
one preallocated file (never a second copy to merge), recording its progress every `index.shard_size` rows, so a
killed import rerun with the same config writes only the rows it had not; then the same FAISS (checkpointed) and
manifest stages as `build`. The manifest names the
encoder the vectors came from as the config gives it (`encoder.name`, `pooling`, `normalize`): no weights are
hashed, so its fingerprint is "imported".
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from index_builder.build import (
    BuildError,
    check_folder,
    check_settings,
    corpus_fingerprint,
    finish,
    identity,
    refuse_duplicate_ids,
    save_state,
)
from rag.config import BuildConfig, save_config
from rag.files import NpyRows, create_npy, writing
from rag.index_kinds import chunks
from rag.retrieval.index_folder import STORE_FILE, VECTORS_FILE, VECTORS_PART, IndexFolder, refuse_link
from rag.retrieval.passages import PassageRecord
from rag.retrieval.store import StoreWriter

log = logging.getLogger(__name__)

FORMATS = ("hf_disk", "arrow", "parquet", "npy")


def import_index(cfg: BuildConfig, progress: bool = True) -> Path:
    """Import (or resume importing, or find already imported) `cfg.output`; return its path."""
    if cfg.corpus.format not in FORMATS:
        raise BuildError(f"corpus.format {cfg.corpus.format!r} cannot be imported; use one of {', '.join(FORMATS)} "
                         "(a corpus without vectors is built with `index_builder build`)")
    check_settings(cfg)
    out = IndexFolder(cfg.output).path
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} is a file, not a folder; give the index a folder of its own")
    state = check_folder(out, cfg, how="remove the folder and import again")
    if state and state.get("complete"):
        log.info("%s is already imported with this config", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    state = state or {"identity": identity(cfg), "corpus": corpus_fingerprint(cfg), "stages": {}}
    save_state(out, state)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    if "vectors" not in state["stages"]:
        count = _passages_and_vectors(out, cfg, state, progress)
        state["stages"]["passages"] = {"report": {"passages_written": count, "imported": True},
                                       "seconds": time.perf_counter() - t0}
        state["stages"]["vectors"] = {"seconds": 0.0, "fingerprint": "imported", "precision": "imported"}
        state.pop("progress", None)
        save_state(out, state)
    finish(out, cfg, state, progress)
    return out


def _passages_and_vectors(out: Path, cfg: BuildConfig, state: dict, progress: bool) -> int:
    """One pass over the source: the passage store, and the vectors written straight into their place in one
    preallocated file (no shards to merge: the vectors are never twice on disk). Every `index.shard_size` rows the
    file is synced and build.json records the rows written, so a rerun after a kill rewrites only the rest (the
    passage store, small beside the vectors, is written again whole)."""
    from tqdm.auto import tqdm

    folder = IndexFolder(out)
    part = folder.file(VECTORS_PART)
    total = _source_rows(cfg)
    saved = state.setdefault("progress", {})
    done = saved.get("vector_rows", 0) if part.is_file() else 0
    size, count, vectors = cfg.index.shard_size, 0, None
    with writing(out / STORE_FILE) as tmp:
        with StoreWriter(tmp) as writer, tqdm(total=total, unit="passage", desc="import",
                                              disable=not progress) as bar:
            for ids, titles, texts, vecs in _batches(cfg):
                if vectors is None:
                    vectors = _open_part(part, cfg, total, vecs.shape[1], done)
                if vecs.shape[1] != vectors.shape[1]:
                    raise BuildError(f"{cfg.corpus.path}: vectors of dimension {vecs.shape[1]} after {count} rows "
                                     f"of dimension {vectors.shape[1]}")
                if count + len(vecs) > total:
                    raise BuildError(f"{cfg.corpus.path}: more rows than the {total} its metadata announced")
                if not np.isfinite(vecs).all():
                    raise BuildError(f"{cfg.corpus.path}: NaN or infinite values in the vectors of rows "
                                     f"{count}-{count + len(vecs) - 1}")
                writer.add([PassageRecord(str(i), str(i), t or "", x or "")
                            for i, t, x in zip(ids, titles, texts, strict=True)])
                start, count = count, count + len(vecs)
                if count > done:
                    vectors.write(max(start, done), vecs[max(start, done) - start:])
                    if count // size > start // size or count == total:
                        vectors.sync()
                        saved["vector_rows"] = count
                        save_state(out, state)
                bar.update(len(vecs))
        if count == 0:
            raise BuildError(f"{cfg.corpus.path}: no passages to import")
        if count != total:
            raise BuildError(f"{cfg.corpus.path}: {count} passages but {total} vectors")
        refuse_duplicate_ids(tmp, cfg)
    os.replace(part, out / VECTORS_FILE)
    return count


def _open_part(part: Path, cfg: BuildConfig, total: int, dim: int, done: int) -> NpyRows:
    """The vectors file being filled: the one a killed run left (same shape), or a new preallocated one."""
    refuse_link(part)
    if done:
        vectors = NpyRows(part, writable=True)
        if vectors.shape == (total, dim) and vectors.dtype == np.dtype(cfg.index.vector_dtype):
            log.info("resuming the import into %s: %d of %d rows already written", part.parent, done, total)
            return vectors
    create_npy(part, cfg.index.vector_dtype, (total, dim))
    return NpyRows(part, writable=True)


def _source_rows(cfg: BuildConfig) -> int:
    """How many rows the source holds, from its metadata (Arrow and Parquet footers, .npy headers): read nothing."""
    c = cfg.corpus
    if c.format == "npy":
        return sum(len(a) for _, a in _npy_arrays(cfg))
    return sum(rows for rows, _ in _tables(c.format, _source_path(cfg)))


def _source_path(cfg: BuildConfig) -> Path:
    if cfg.corpus.path is None:
        raise BuildError("corpus.path is required for an import")
    path = Path(cfg.corpus.path).expanduser()
    if not path.exists():
        raise BuildError(f"corpus.path {path} does not exist")
    return path


def _batches(cfg: BuildConfig) -> Iterator[tuple[list, list, list, np.ndarray]]:
    """(ids, titles, texts, (n, D) float32 vectors) in source order, a few thousand rows at a time."""
    c = cfg.corpus
    path = _source_path(cfg)
    if c.format == "npy":
        yield from _npy_batches(cfg, path)
        return
    for _, batches in _tables(c.format, path):
        for batch in batches():
            names = set(batch.schema.names)
            missing = [f for f in (c.id_field, c.title_field, c.text_field, c.embeddings_field) if f not in names]
            if missing:
                raise BuildError(f"{path}: no column {', '.join(map(repr, missing))} (columns: "
                                 f"{', '.join(sorted(names))}); set corpus.id_field / title_field / text_field / "
                                 "embeddings_field")
            yield (batch.column(c.id_field).to_pylist(), batch.column(c.title_field).to_pylist(),
                   batch.column(c.text_field).to_pylist(), _vectors_of(batch.column(c.embeddings_field), path, c))


def _vectors_of(emb, path: Path, c) -> np.ndarray:
    try:
        vecs = np.stack(emb.to_numpy(zero_copy_only=False)).astype(np.float32, copy=False) \
            if len(emb) else np.zeros((0, 0), np.float32)
    except (ValueError, TypeError) as e:
        raise BuildError(f"{path}: column {c.embeddings_field!r} is not a list of equal-length vectors ({e})") \
            from None
    if vecs.ndim != 2:
        raise BuildError(f"{path}: column {c.embeddings_field!r} holds {vecs.ndim}-d values, not vectors")
    return vecs


def _tables(fmt: str, path: Path):
    """(rows, a function giving its record batches) for each table of the source in file order: rows from the
    metadata, batches streamed (memory-mapped Arrow, Parquet row groups read in turn): never the corpus whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "hf_disk":
        from datasets import Dataset, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise BuildError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
        if not isinstance(ds, Dataset):
            raise BuildError(f"{path}: a DatasetDict ({', '.join(ds)}); give the folder of one split")
        table = (ds.flatten_indices() if ds._indices is not None else ds).data.table
        yield table.num_rows, lambda: table.to_batches(max_chunksize=BATCH)
        return
    suffix = ".arrow" if fmt == "arrow" else ".parquet"
    files = sorted(path.rglob(f"*{suffix}")) if path.is_dir() else [path]
    if not files:
        raise BuildError(f"{path}: no {suffix} files")
    for f in files:
        try:
            if fmt == "parquet":
                pf = pq.ParquetFile(f, memory_map=True)
                yield pf.metadata.num_rows, lambda pf=pf: pf.iter_batches(batch_size=BATCH)
                continue
            source = pa.memory_map(str(f))
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()  # datasets writes Arrow streams
            yield table.num_rows, lambda table=table: table.to_batches(max_chunksize=BATCH)
        except (pa.ArrowInvalid, OSError) as e:
            raise BuildError(f"{f}: cannot be read as {fmt} ({str(e).splitlines()[0][:200]})") from None


BATCH = 4096  # rows per batch read from a source


def _npy_arrays(cfg: BuildConfig) -> list[tuple[Path, NpyRows]]:
    """The `.npy` vector shards of an npy import, in name order, read with file I/O (rag.files.NpyRows)."""
    c = cfg.corpus
    if not c.vectors:
        raise BuildError("corpus.format npy needs corpus.vectors: a .npy file or a folder of .npy shards")
    where = Path(c.vectors).expanduser()
    shards = sorted(where.glob("*.npy")) if where.is_dir() else [where]
    if not shards or not shards[0].is_file():
        raise BuildError(f"corpus.vectors {where}: no .npy files")
    arrays = []
    for s in shards:
        try:
            arrays.append((s, NpyRows(s)))
        except (ValueError, OSError) as e:
            raise BuildError(f"{s}: not a .npy array of (rows, dim) vectors ({str(e).splitlines()[0][:200]})") \
                from None
    return arrays


def _npy_batches(cfg: BuildConfig, path: Path):
    """The passages file's rows beside the vector shards' rows, BATCH at a time."""
    from dataclasses import replace

    from rag.retrieval.passages import ReadReport, read_corpus

    c = cfg.corpus
    where = Path(c.vectors).expanduser()
    arrays = [a for _, a in _npy_arrays(cfg)]
    total = sum(len(a) for a in arrays)
    docs = read_corpus(replace(c, format="jsonl" if path.suffix in (".jsonl", ".json") else "dpr_tsv"), ReadReport())
    blocks = (a[s:e] for a in arrays for s, e in chunks(len(a), BATCH))
    seen = 0
    batch, pending = [], np.zeros((0, arrays[0].shape[1]), np.float32)
    for doc in docs:
        batch.append(doc)
        if len(batch) == BATCH:
            rows, pending = _take(len(batch), pending, blocks, path, where)
            yield [d.id for d in batch], [d.title for d in batch], [d.text for d in batch], rows
            seen += len(batch)
            batch = []
    if batch:
        rows, pending = _take(len(batch), pending, blocks, path, where)
        yield [d.id for d in batch], [d.title for d in batch], [d.text for d in batch], rows
        seen += len(batch)
    if seen != total:
        raise BuildError(f"{path}: {seen} passages but {where} holds {total} vectors")


def _take(n: int, pending: np.ndarray, blocks, path: Path, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """n vector rows (float32) from what is pending and the next blocks; the rest stays pending."""
    while len(pending) < n:
        block = next(blocks, None)
        if block is None:
            raise BuildError(f"{path}: more passages than {where} holds vectors")
        pending = np.concatenate([pending, np.asarray(block, np.float32)])
    return pending[:n], pending[n:]
