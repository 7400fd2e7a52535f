"""Incremental updates of a built index folder: add, replace and delete documents; compact.

Every update writes a new generation beside the current one: a new passage/vector segment for what was added, a
new FAISS index file, a new list of deleted rows, then `manifest.json` is replaced in one atomic rename. A crash
before that rename leaves the previous generation current and intact; rerunning the update overwrites the
half-written files. Files no longer referenced are removed after the switch (open memory maps keep working).
Only the passages of added or replaced documents are encoded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rag.config import BuildConfig, CorpusConfig, IndexConfig, load_config
from rag.encoders import Encoder
from rag.index import (
    MANIFEST,
    DenseIndex,
    augment,
    build_faiss,
    factory_string,
    file_entry,
    layout,
    write_json_atomic,
)
from rag.passages import Document, ReadReport, read_corpus, sentence_splitter, split_document
from rag.store import StoreWriter

log = logging.getLogger(__name__)

LOCK = ".update.lock"


class UpdateError(RuntimeError):
    pass


@dataclass
class UpdateReport:
    generation: int
    added_docs: list[str] = field(default_factory=list)
    replaced_docs: list[str] = field(default_factory=list)
    deleted_docs: list[str] = field(default_factory=list)
    unknown_deletes: list[str] = field(default_factory=list)
    added_passages: int = 0
    removed_passages: int = 0
    skipped_malformed: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@contextmanager
def folder_lock(folder: Path):
    """One writer per folder. flock is released by the kernel when a process dies, so a killed update leaves
    no stale lock behind."""
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise UpdateError(f"{folder} is being updated by another process ({holder or 'unknown'}); "
                              f"wait for it to finish and run this update again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _build_config(folder: Path, overrides: tuple[str, ...]) -> BuildConfig:
    return load_config(BuildConfig, folder / "config.yaml", (f"output={folder}", *overrides))


def _check_encoder(manifest: dict, encoder: Encoder, folder: Path) -> None:
    built = manifest["encoder"]
    now = {"name": encoder.cfg.name, "pooling": encoder.cfg.pooling, "normalize": encoder.cfg.normalize,
           "fingerprint": encoder.fingerprint}
    diff = [k for k in ("fingerprint", "pooling", "normalize") if built.get(k) != now[k]]
    if diff:
        raise UpdateError(
            f"{folder / MANIFEST}: the index was built with encoder {built['name']} (pooling {built['pooling']}, "
            f"normalize {built['normalize']}, weights {built['fingerprint']}); this update would encode with "
            f"{now['name']} (pooling {now['pooling']}, normalize {now['normalize']}, weights {now['fingerprint']}). "
            "Passages from two encoders are not comparable: use the index's encoder, or rebuild the index.")


def _read_docs(path: str | None, fmt: str, on_error: str, report: UpdateReport) -> list[Document]:
    if not path:
        return []
    counts = ReadReport()
    docs = list(read_corpus(CorpusConfig(format=fmt, path=path, on_error=on_error), counts))
    report.skipped_malformed += counts.skipped_malformed
    return docs


def _read_ids(path: str | None) -> list[str]:
    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise UpdateError(f"delete list {p} does not exist")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _gen_name(name: str, generation: int) -> str:
    stem, dot, ext = name.partition(".")
    return f"{stem}.g{generation:04d}.{ext}"


def _switch(folder: Path, old: dict, new: dict) -> None:
    """Make `new` current with one atomic rename, then remove files only the old generation used."""
    write_json_atomic(folder / MANIFEST, new)
    for name in set(old["files"]) - set(new["files"]):
        (folder / name).unlink(missing_ok=True)


def _drift_warning(index: faiss.Index, cfg: IndexConfig, old_sample: np.ndarray, new: np.ndarray) -> str | None:
    """IVF-PQ: compare how far new vectors lie from their nearest coarse centroid with the indexed data."""
    if cfg.type != "ivfpq" or not len(new) or not len(old_sample):
        return None
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)  # (nlist, D)

    def spread(x):  # mean distance to the assigned centroid: what PQ has to encode
        x = np.ascontiguousarray(x, dtype=np.float32)
        _, assigned = ivf.quantizer.search(x, 1)
        return float(np.linalg.norm(x - centroids[assigned[:, 0]], axis=1).mean())

    old, now = spread(old_sample), spread(new)
    if old > 0 and abs(now / old - 1) > 0.5:
        return (f"the added vectors sit {now / old:.2f}x as far from the IVF centroids as the indexed ones "
                "(scores differ that much from the training sample): `index_builder compact --retrain` would help")
    return None


def update(folder: str | Path, add: str | None = None, replace: str | None = None, delete: str | None = None,
           fmt: str = "jsonl", on_error: str = "raise", overrides: tuple[str, ...] = (),
           progress: bool = True, _before_switch=None) -> UpdateReport:
    """Add, replace and delete documents (keyed by document id) in `folder` as a new generation."""
    folder = Path(folder).expanduser()
    t0 = time.perf_counter()
    with folder_lock(folder):
        current = DenseIndex.load(folder)  # reads the manifest and checks the files against it
        manifest = current.manifest
        files = layout(manifest)
        gen = files["generation"] + 1
        report = UpdateReport(generation=gen)
        cfg = _build_config(folder, overrides)
        doc_col = current.store.table.column("doc_id")
        live = np.ones(current.index.ntotal, dtype=bool)
        live[current.deleted] = False
        known = set(pc.unique(doc_col.filter(pa.array(live))).to_pylist())  # documents searchable now

        adds = _read_docs(add, fmt, on_error, report)
        replaces = _read_docs(replace, fmt, on_error, report)
        deletes = _read_ids(delete)
        clash = [d.id for d in adds if d.id in known]
        if clash:
            raise UpdateError(f"{add}: document(s) already in the index: {', '.join(clash[:10])}; "
                              "use --replace to change them")
        report.unknown_deletes = [i for i in deletes if i not in known]
        if report.unknown_deletes:
            msg = f"not in the index, nothing deleted for: {', '.join(report.unknown_deletes[:20])}"
            log.warning(msg)
            report.warnings.append(msg)
        report.deleted_docs = [i for i in deletes if i in known]
        report.replaced_docs = [d.id for d in replaces if d.id in known]
        new_docs = adds + replaces
        report.added_docs = [d.id for d in adds] + [d.id for d in replaces if d.id not in known]
        if not new_docs and not report.deleted_docs:
            log.warning("nothing to change in %s", folder)
            return report

        gone = set(report.deleted_docs) | set(report.replaced_docs)
        hit = pc.is_in(doc_col, value_set=pa.array(sorted(gone), type=pa.string())).to_numpy(zero_copy_only=False)
        removed_rows = np.flatnonzero(hit & live)
        report.removed_passages = int(len(removed_rows))

        splitter = sentence_splitter(cfg.passages.language) if cfg.passages.sentence_boundaries else None
        passages = [p for d in new_docs for p in split_document(d, cfg.passages, splitter)]
        report.added_passages = len(passages)
        new_manifest = dict(manifest)
        segments = list(files["segments"])
        new_files = dict(manifest["files"])
        index = faiss.read_index(str(folder / files["index_file"]))  # a private copy to add to
        if passages:
            encoder = Encoder.from_config(cfg.encoder)
            _check_encoder(manifest, encoder, folder)
            vecs = encoder.encode([p.text for p in passages], [p.title for p in passages],
                                  progress="encode new passages" if progress else False)
            store_name, vec_name = _gen_name("passages.arrow", gen), _gen_name("vectors.npy", gen)
            with StoreWriter(folder / store_name) as w:
                w.add(passages)
            with open(folder / vec_name, "wb") as f:
                np.save(f, vecs.astype(cfg.index.vector_dtype))
            segments.append({"store": store_name, "vectors": vec_name, "rows": len(passages)})
            new_files[store_name] = file_entry(folder / store_name)
            new_files[vec_name] = file_entry(folder / vec_name)
            norm2 = manifest["index"].get("mips_norm2")
            if norm2 is not None and float(np.einsum("nd,nd->n", vecs, vecs).max()) > norm2 * (1 + 1e-6):
                report.warnings.append("added passages have larger norms than the HNSW transform's bound; their "
                                       "scores are approximate until `index_builder compact`")
            sample = np.asarray(current.vectors[np.sort(np.random.default_rng(0).choice(
                current.index.ntotal, min(2000, current.index.ntotal), replace=False))], dtype=np.float32)
            warning = _drift_warning(index, current.cfg, sample, vecs)
            if warning:
                log.warning(warning)
                report.warnings.append(warning)
            index.add(augment(vecs, norm2))
        index_name = _gen_name("index.faiss", gen)
        faiss.write_index(index, str(folder / index_name))
        new_files[index_name] = file_entry(folder / index_name)
        new_files.pop(files["index_file"], None)
        deleted = np.union1d(current.deleted, removed_rows).astype(np.int64)
        if files["deleted_file"]:
            new_files.pop(files["deleted_file"], None)
        deleted_name = None
        if len(deleted):
            deleted_name = _gen_name("deleted.npy", gen)
            np.save(folder / deleted_name, deleted)
            new_files[deleted_name] = file_entry(folder / deleted_name)
        report.seconds = time.perf_counter() - t0
        new_manifest.update({
            "generation": gen, "segments": segments, "index_file": index_name, "deleted_file": deleted_name,
            "deleted": int(len(deleted)), "count": int(index.ntotal), "files": new_files,
            "history": [*manifest.get("history", []), {
                "generation": gen, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **{k: v for k, v in asdict(report).items() if k != "generation"}}],
        })
        if _before_switch is not None:
            _before_switch()  # tests: a crash after writing the new files, before the switch
        _switch(folder, manifest, new_manifest)
        log.info("%s: generation %d current (+%d passages, -%d)", folder, gen, report.added_passages,
                 report.removed_passages)
        return report


def compact(folder: str | Path, retrain: bool = False, progress: bool = True, index: dict | None = None) -> int:
    """Rewrite `folder` as one segment without deleted rows (a new generation); return the rows dropped.

    `index` changes index settings on the way (e.g. {"type": "hnsw"}): a new index over the stored vectors,
    no passage is encoded again."""
    folder = Path(folder).expanduser()
    with folder_lock(folder):
        current = DenseIndex.load(folder)
        manifest = current.manifest
        gen = layout(manifest)["generation"] + 1
        keep = np.setdiff1d(np.arange(current.index.ntotal), current.deleted)
        store_name, vec_name, index_name = (_gen_name(n, gen) for n in ("passages.arrow", "vectors.npy",
                                                                       "index.faiss"))
        with StoreWriter(folder / store_name) as w:
            for s in range(0, len(keep), 10_000):
                w.add(p for p in current.passages(keep[s : s + 10_000]))
        vectors = np.lib.format.open_memmap(folder / vec_name, mode="w+", dtype=current.vectors.dtype,
                                            shape=(len(keep), current.dim))
        for s in range(0, len(keep), 50_000):
            vectors[s : s + 50_000] = current.vectors[keep[s : s + 50_000]]
        vectors.flush()
        cfg = IndexConfig(**{**asdict(current.cfg), **(index or {})})
        if cfg.type == "ivfpq" and not retrain and not index:
            index = faiss.read_index(str(folder / layout(manifest)["index_file"]))
            index.reset()  # keeps the trained quantiser and codebooks
            for s in range(0, len(keep), 20_000):
                index.add(np.ascontiguousarray(vectors[s : s + 20_000], dtype=np.float32))
            norm2 = None
        else:
            index, extra = build_faiss(vectors, cfg, progress)
            norm2 = extra["mips_norm2"]
        faiss.write_index(index, str(folder / index_name))
        del vectors
        names = (store_name, vec_name, index_name)
        new = dict(manifest)
        new.update({
            "generation": gen, "segments": [{"store": store_name, "vectors": vec_name, "rows": int(len(keep))}],
            "index_file": index_name, "deleted_file": None, "deleted": 0, "count": int(len(keep)),
            "index": {**manifest["index"], **asdict(cfg), "factory": factory_string(cfg), "mips_norm2": norm2},
            "files": {n: file_entry(folder / n) for n in names},
            "history": [*manifest.get("history", []), {
                "generation": gen, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "compacted": int(len(current.deleted)), "retrained": bool(retrain)}],
        })
        _switch(folder, manifest, new)
        return int(len(current.deleted))
