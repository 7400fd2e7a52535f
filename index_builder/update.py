"""Incremental updates of a built index folder: add, replace and delete documents; compact.

Every update writes a new generation beside the current one: a new passage/vector segment for what was added, a
new FAISS index file, a new list of deleted rows, then `manifest.json` is replaced in one atomic rename. A crash
before that rename leaves the previous generation current and intact; rerunning the update overwrites the
half-written files. Files no longer referenced are removed after the switch (open memory maps keep working).
Only the passages of added or replaced documents are encoded.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from index_builder.build import build_sparse
from rag.config import BuildConfig, CorpusConfig, IndexConfig, SparseConfig, load_config
from rag.config_files import apply_overrides, from_dict
from rag.errors import RagError
from rag.files import open_npy, save_npy, write_faiss, writing
from rag.index_kinds import coarse_space, kind_of
from rag.retrieval import bm25
from rag.retrieval.encoders import Encoder
from rag.retrieval.index import DenseIndex, augment, build_faiss, factory_string
from rag.retrieval.index_folder import DELETED_FILE, INDEX_FILE, STORE_FILE, VECTORS_FILE, IndexFolder
from rag.retrieval.passages import Document, ReadReport, read_corpus, sentence_splitter, split_document
from rag.retrieval.store import PassageStore, StoreWriter

log = logging.getLogger(__name__)

class UpdateError(RagError):
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


def _build_config(folder: Path, overrides: tuple[str, ...]) -> BuildConfig:
    return load_config(BuildConfig, IndexFolder(folder).config_path, (f"output={folder}", *overrides))


def _sparse_settings(record: dict | None, cfg: BuildConfig, overrides: tuple[str, ...]) -> SparseConfig:
    """The BM25 part this update wants: the built part's settings (the manifest owns them; the folder's build config
    may predate the part) with the `--set sparse.*` changes on top; the build config's where there is no part yet."""
    if not record:
        return cfg.sparse
    changes = [o for o in overrides if o.strip().startswith("sparse.")]
    merged = apply_overrides({"sparse": asdict(bm25.config_of(record))}, changes)["sparse"]
    return from_dict(SparseConfig, merged, "--set sparse")


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
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UpdateError(f"delete list {p}: invalid UTF-8 at byte offset {e.start}; write one document id per line "
                          "in UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _drift_warning(index: faiss.Index, cfg: IndexConfig, old_sample: np.ndarray, new: np.ndarray) -> str | None:
    """IVF-PQ: compare how far new vectors lie from their nearest coarse centroid with the indexed data."""
    if not kind_of(cfg).keeps_training or not len(new) or not len(old_sample):
        return None
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)  # (nlist, D)

    def spread(x):  # mean distance to the assigned centroid: what PQ has to encode
        x = coarse_space(index, np.ascontiguousarray(x, dtype=np.float32))
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
    where = IndexFolder(folder)
    t0 = time.perf_counter()
    with where.lock():
        current = DenseIndex.load(where)  # reads the manifest and checks the files against it
        manifest = current.manifest
        where.sweep(manifest)
        files = where.layout(manifest)
        report = UpdateReport(generation=files["generation"] + 1)
        cfg = _build_config(where.path, overrides)
        record = manifest.get("sparse")
        wanted = _sparse_settings(record, cfg, overrides)
        wants_bm25 = wanted.kind == "bm25"
        new_docs, removed_rows = _plan(current, Changes(add, replace, delete, fmt, on_error), report)
        # `--set sparse.kind=bm25` adds the part, another sparse setting rebuilds it, sparse.kind=none drops it
        changes_bm25 = bool(record) != wants_bm25 or bool(record) and wanted != bm25.config_of(record)
        if not new_docs and not report.deleted_docs and not changes_bm25:
            log.warning("nothing to change in %s; it stays at generation %d", where.path, files["generation"])
            report.generation = files["generation"]  # no generation was written
            return report
        splitter = sentence_splitter(cfg.passages.language) if cfg.passages.sentence_boundaries else None
        passages = [p for d in new_docs for p in split_document(d, cfg.passages, splitter)]
        report.added_passages = len(passages)
        segments = list(files["segments"])
        index = faiss.read_index(str(where.file(files["index_file"])))  # a private copy to add to
        index_settings = None
        if passages:
            segment, index, index_settings = _add_segment(where, current, cfg, passages, index, report, progress)
            segments.append(segment)
        sparse = record if wants_bm25 else None
        if wants_bm25 and (changes_bm25 or passages):  # in step with the dense part's rows
            store = PassageStore([where.file(seg["store"]) for seg in segments])
            sparse = build_sparse(where, report.generation, store, wanted)
        # no new rows: the part's files stay as they are; deleted rows are masked at load, as in FAISS
        new_manifest = _write_generation(where, current, segments, index, removed_rows, index_settings, sparse,
                                         report, t0)
        if _before_switch is not None:
            _before_switch()  # tests: a crash after writing the new files, before the switch
        where.switch(manifest, new_manifest)
        log.info("%s: generation %d current (+%d passages, -%d)", where.path, report.generation,
                 report.added_passages, report.removed_passages)
        return report


@dataclass(frozen=True)
class Changes:
    """What an update was asked to do: files of documents to add and to replace, a file of ids to delete."""

    add: str | None
    replace: str | None
    delete: str | None
    fmt: str
    on_error: str


def _plan(current: DenseIndex, asked: Changes, report: UpdateReport) -> tuple[list[Document], np.ndarray]:
    """Read and check the changes against the documents searchable now: the documents to encode and the rows to
    mask. Fills the report's lists."""
    doc_col = current.store.table.column("doc_id")
    live = np.ones(current.index.ntotal, dtype=bool)
    live[current.deleted] = False
    known = set(pc.unique(doc_col.filter(pa.array(live))).to_pylist())  # documents searchable now
    adds = _read_docs(asked.add, asked.fmt, asked.on_error, report)
    replaces = _read_docs(asked.replace, asked.fmt, asked.on_error, report)
    deletes = _read_ids(asked.delete)
    repeated = sorted(i for i, n in Counter(d.id for d in adds + replaces).items() if n > 1)
    if repeated:
        raise UpdateError(f"{asked.add or asked.replace}: document id(s) given twice in this update: "
                          f"{', '.join(repeated[:10])}; give each document once")
    clash = [d.id for d in adds if d.id in known]
    if clash:
        raise UpdateError(f"{asked.add}: document(s) already in the index: {', '.join(clash[:10])}; "
                          "use --replace to change them")
    report.unknown_deletes = [i for i in deletes if i not in known]
    if report.unknown_deletes:
        msg = f"not in the index, nothing deleted for: {', '.join(report.unknown_deletes[:20])}"
        log.warning(msg)
        report.warnings.append(msg)
    report.deleted_docs = [i for i in deletes if i in known]
    report.replaced_docs = [d.id for d in replaces if d.id in known]
    report.added_docs = [d.id for d in adds] + [d.id for d in replaces if d.id not in known]
    gone = set(report.deleted_docs) | set(report.replaced_docs)
    hit = pc.is_in(doc_col, value_set=pa.array(sorted(gone), type=pa.string())).to_numpy(zero_copy_only=False)
    removed_rows = np.flatnonzero(hit & live)
    report.removed_passages = int(len(removed_rows))
    return adds + replaces, removed_rows


def _add_segment(where: IndexFolder, current: DenseIndex, cfg: BuildConfig, passages: list, index: faiss.Index,
                 report: UpdateReport, progress: bool) -> tuple[dict, faiss.Index, dict | None]:
    """Encode the new passages with the index's own encoder, write them as the generation's segment and add them
    to the index; returns the segment, the index and changed index settings (None when unchanged)."""
    manifest, gen = current.manifest, report.generation
    encoder = Encoder.from_config(cfg.encoder)
    where.check_encoder(manifest, encoder.identity(), same_weights=True)
    vecs = encoder.encode([p.text for p in passages], [p.title for p in passages],
                          progress="encode new passages" if progress else False)
    store_name, vec_name = where.generation_name(STORE_FILE, gen), where.generation_name(VECTORS_FILE, gen)
    with writing(where.file(store_name)) as tmp, StoreWriter(tmp) as w:
        w.add(passages)
    save_npy(where.file(vec_name), vecs.astype(cfg.index.vector_dtype))
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
    settings = None
    if index.ntotal == 0 and not current.kind.keeps_training:  # an emptied index: build it anew over these
        index, extra = build_faiss(vecs, current.cfg, progress=False)
        settings = {**manifest["index"], "mips_norm2": extra["mips_norm2"]}
    else:
        index.add(augment(vecs, norm2))
    return {"store": store_name, "vectors": vec_name, "rows": len(passages)}, index, settings


def _write_generation(where: IndexFolder, current: DenseIndex, segments: list[dict], index: faiss.Index,
                      removed_rows: np.ndarray, index_settings: dict | None, sparse: dict | None,
                      report: UpdateReport, t0: float) -> dict:
    """Write the generation's index and deletion list; returns its manifest (not yet current)."""
    gen = report.generation
    index_name = where.generation_name(INDEX_FILE, gen)
    write_faiss(index, where.file(index_name))
    deleted = np.union1d(current.deleted, removed_rows).astype(np.int64)
    deleted_name = None
    if len(deleted):
        deleted_name = where.generation_name(DELETED_FILE, gen)
        save_npy(where.file(deleted_name), deleted)
    report.seconds = time.perf_counter() - t0
    return where.next_manifest(
        current.manifest, segments=segments, index_file=index_name, deleted_file=deleted_name,
        deleted=len(deleted), count=index.ntotal, index=index_settings, sparse=sparse,
        history={k: v for k, v in asdict(report).items() if k != "generation"})


def compact(folder: str | Path, retrain: bool = False, progress: bool = True, index: dict | None = None) -> int:
    """Rewrite `folder` as one segment without deleted rows (a new generation); return the rows dropped.

    `index` changes index settings on the way (e.g. {"type": "hnsw"}): a new index over the stored vectors,
    no passage is encoded again."""
    where = IndexFolder(folder)
    with where.lock():
        current = DenseIndex.load(where)
        manifest = current.manifest
        where.sweep(manifest)
        gen = where.layout(manifest)["generation"] + 1
        keep = np.setdiff1d(np.arange(current.index.ntotal), current.deleted)
        store_name, vec_name, index_name = (where.generation_name(n, gen) for n in (STORE_FILE, VECTORS_FILE,
                                                                                   INDEX_FILE))
        with writing(where.file(store_name)) as tmp, StoreWriter(tmp) as w:
            for s in range(0, len(keep), 10_000):
                w.add(p for p in current.passages(keep[s : s + 10_000]))
        with writing(where.file(vec_name)) as tmp:
            vectors = open_npy(tmp, current.vectors.dtype, (len(keep), current.dim))
            for s in range(0, len(keep), 50_000):
                vectors[s : s + 50_000] = current.vectors[keep[s : s + 50_000]]
            vectors.flush()  # the map stays valid after the rename
        cfg = IndexConfig(**{**asdict(current.cfg), **(index or {})})
        if kind_of(cfg).keeps_training and not retrain and not index:
            index = faiss.read_index(str(where.file(where.layout(manifest)["index_file"])))
            index.reset()  # keeps the trained quantiser and codebooks
            for s in range(0, len(keep), 20_000):
                index.add(np.ascontiguousarray(vectors[s : s + 20_000], dtype=np.float32))
            norm2 = None
        else:
            index, extra = build_faiss(vectors, cfg, progress)
            norm2 = extra["mips_norm2"]
        write_faiss(index, where.file(index_name))
        del vectors
        sparse = manifest.get("sparse")
        if sparse:
            sparse = build_sparse(where, gen, PassageStore(where.file(store_name)), bm25.config_of(sparse))
        new = where.next_manifest(
            manifest, segments=[{"store": store_name, "vectors": vec_name, "rows": int(len(keep))}],
            index_file=index_name, deleted_file=None, deleted=0, count=len(keep),
            index={**manifest["index"], **asdict(cfg), "factory": factory_string(cfg), "mips_norm2": norm2},
            sparse=sparse,
            history={"compacted": int(len(current.deleted)), "retrained": bool(retrain)})
        where.switch(manifest, new)
        return int(len(current.deleted))
