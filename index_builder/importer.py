"""`index_builder import`: an index folder from passages that already carry their vectors (no encoding).

Sources (corpus.format): a `datasets` folder written by `save_to_disk` (e.g. wiki_dpr: id, text, title,
embeddings), Arrow IPC or Parquet files with an embeddings column, or `npy`: a passages file (jsonl / dpr_tsv) with
`.npy` vector shards beside it. Never pickles. Passage ids and texts are kept as given (no splitting). The stream
is cut into shards of `index.shard_size` rows, each written once whole, so a killed import rerun with the same
config keeps its finished shards; then the same merge, FAISS and manifest stages as `build`. The manifest names the
encoder the vectors came from as the config gives it (`encoder.name`, `pooling`, `normalize`): no weights are
hashed, so its fingerprint is "imported".
"""

from __future__ import annotations

import logging
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
    merge_shards,
    refuse_duplicate_ids,
    save_state,
    shard_path,
)
from rag.config import BuildConfig, save_config
from rag.files import save_npy, writing
from rag.index_folder import STORE_FILE, IndexFolder
from rag.passages import PassageRecord
from rag.store import StoreWriter

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
        count, dim = _passages_and_shards(out, cfg, progress)
        state["stages"]["passages"] = {"report": {"passages_written": count, "imported": True},
                                       "seconds": time.perf_counter() - t0}
        t1 = time.perf_counter()
        merge_shards(out, cfg, count, dim)
        state["stages"]["vectors"] = {"seconds": time.perf_counter() - t1, "fingerprint": "imported",
                                      "precision": "imported"}
        save_state(out, state)
    finish(out, cfg, state, progress)
    return out


def _passages_and_shards(out: Path, cfg: BuildConfig, progress: bool) -> tuple[int, int]:
    """One pass over the source: the passage store, and every vector shard not yet on disk."""
    from tqdm.auto import tqdm

    IndexFolder(out).make_shards()
    size, count, dim, shard = cfg.index.shard_size, 0, None, 0
    pending_vecs: list[np.ndarray] = []
    with writing(out / STORE_FILE) as tmp:
        with StoreWriter(tmp) as writer, tqdm(unit="passage", desc="import", disable=not progress) as bar:
            for ids, titles, texts, vecs in _batches(cfg):
                if dim is None:
                    dim = vecs.shape[1]
                elif vecs.shape[1] != dim:
                    raise BuildError(f"{cfg.corpus.path}: vectors of dimension {vecs.shape[1]} after {count} rows "
                                     f"of dimension {dim}")
                if not np.isfinite(vecs).all():
                    raise BuildError(f"{cfg.corpus.path}: NaN or infinite values in the vectors of rows "
                                     f"{count}-{count + len(vecs) - 1}")
                rows = [PassageRecord(str(i), str(i), t or "", x or "")
                        for i, t, x in zip(ids, titles, texts, strict=True)]
                writer.add(rows)
                pending_vecs.append(vecs)
                count += len(rows)
                bar.update(len(rows))
                while sum(len(v) for v in pending_vecs) >= size:
                    block = np.concatenate(pending_vecs)
                    _write_shard(out, shard, block[:size], cfg)
                    pending_vecs, shard = [block[size:]], shard + 1
            if pending_vecs and sum(len(v) for v in pending_vecs):
                _write_shard(out, shard, np.concatenate(pending_vecs), cfg)
        if count == 0:
            raise BuildError(f"{cfg.corpus.path}: no passages to import")
        refuse_duplicate_ids(tmp, cfg)
    return count, dim


def _write_shard(out: Path, i: int, vecs: np.ndarray, cfg: BuildConfig) -> None:
    path = shard_path(out, i)
    if path.is_file():  # written whole by an earlier, killed run
        return
    save_npy(path, vecs.astype(cfg.index.vector_dtype))


def _batches(cfg: BuildConfig) -> Iterator[tuple[list, list, list, np.ndarray]]:
    """(ids, titles, texts, (n, D) float32 vectors) in source order, a few thousand rows at a time."""
    c = cfg.corpus
    if c.path is None:
        raise BuildError("corpus.path is required for an import")
    path = Path(c.path).expanduser()
    if not path.exists():
        raise BuildError(f"corpus.path {path} does not exist")
    if c.format == "npy":
        yield from _npy_batches(cfg, path)
        return
    for table in _tables(c.format, path):
        names = set(table.schema.names)
        missing = [f for f in (c.id_field, c.title_field, c.text_field, c.embeddings_field) if f not in names]
        if missing:
            raise BuildError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(sorted(names))});"
                             " set corpus.id_field / title_field / text_field / embeddings_field")
        for batch in table.to_batches(max_chunksize=4096):
            emb = batch.column(c.embeddings_field)
            try:
                vecs = np.stack(emb.to_numpy(zero_copy_only=False)).astype(np.float32, copy=False) \
                    if len(emb) else np.zeros((0, 0), np.float32)
            except (ValueError, TypeError) as e:
                raise BuildError(f"{path}: column {c.embeddings_field!r} is not a list of equal-length vectors "
                                 f"({e})") from None
            if vecs.ndim != 2:
                raise BuildError(f"{path}: column {c.embeddings_field!r} holds {vecs.ndim}-d values, not vectors")
            yield (batch.column(c.id_field).to_pylist(), batch.column(c.title_field).to_pylist(),
                   batch.column(c.text_field).to_pylist(), vecs)


def _tables(fmt: str, path: Path):
    """pyarrow tables (memory-mapped where the format allows) in file order."""
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
        yield (ds.flatten_indices() if ds._indices is not None else ds).data.table
        return
    suffix = ".arrow" if fmt == "arrow" else ".parquet"
    files = sorted(path.rglob(f"*{suffix}")) if path.is_dir() else [path]
    if not files:
        raise BuildError(f"{path}: no {suffix} files")
    for f in files:
        try:
            if fmt == "parquet":
                yield pq.read_table(f, memory_map=True)
                continue
            source = pa.memory_map(str(f))
            try:
                yield pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                yield pa.ipc.open_stream(source).read_all()  # datasets writes Arrow streams
        except (pa.ArrowInvalid, OSError) as e:
            raise BuildError(f"{f}: cannot be read as {fmt} ({str(e).splitlines()[0][:200]})") from None


def _npy_batches(cfg: BuildConfig, path: Path):
    from rag.passages import ReadReport, read_corpus

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
            arrays.append(np.load(s, mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError) as e:
            raise BuildError(f"{s}: not a .npy array ({str(e).splitlines()[0][:200]})") from None
        if arrays[-1].ndim != 2:
            raise BuildError(f"{s}: shape {arrays[-1].shape}; vectors must be (rows, dim)")
    total = sum(len(a) for a in arrays)
    from dataclasses import replace

    docs = read_corpus(replace(c, format="jsonl" if path.suffix in (".jsonl", ".json") else "dpr_tsv"), ReadReport())
    flat = (row for a in arrays for row in _chunks(a))
    batch: list = []
    seen = 0
    for doc in docs:
        batch.append(doc)
        if len(batch) == 4096:
            yield _npy_rows(batch, flat, path, where)
            seen += len(batch)
            batch = []
    if batch:
        yield _npy_rows(batch, flat, path, where)
        seen += len(batch)
    if seen != total:
        raise BuildError(f"{path}: {seen} passages but {where} holds {total} vectors")


def _chunks(a: np.ndarray):
    for s in range(0, len(a), 4096):
        yield from np.asarray(a[s : s + 4096], np.float32)


def _npy_rows(docs, flat, path, where):
    vecs = []
    for _ in docs:
        v = next(flat, None)
        if v is None:
            raise BuildError(f"{path}: more passages than {where} holds vectors")
        vecs.append(v)
    return [d.id for d in docs], [d.title for d in docs], [d.text for d in docs], np.stack(vecs)
