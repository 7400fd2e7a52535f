"""The dense index: FAISS index + passage vectors + passage store of an index folder, opened for search.

The folder's format (manifest, file names, generations) belongs to `rag.retrieval.index_folder.IndexFolder`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from rag.config import IndexConfig
from rag.files import map_rows
from rag.index_kinds import Checkpoints, augment, kind_of, max_norm2  # noqa: F401 - importable (build, update)
from rag.retrieval.index_folder import IndexFolder, IndexFolderError
from rag.retrieval.passages import PassageRecord
from rag.retrieval.store import PassageStore, SegmentedVectors

log = logging.getLogger(__name__)

RETRIES = 3  # re-reads of the manifest when a writer switches generations while the index is being opened


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # (Q, k) int64 row positions, -1 where fewer than k hits
    scores: np.ndarray  # (Q, k) float32 inner products d(z)ᵀq(x); -inf where the id is -1
    vectors: np.ndarray | None = None  # (Q, k, D) float32 stored d(z), on request (zeros where the id is -1)


def factory_string(cfg: IndexConfig) -> str:
    return kind_of(cfg).factory(cfg)


def build_faiss(vectors: np.ndarray, cfg: IndexConfig, progress: bool = True,
                saved: Checkpoints | None = None) -> tuple[faiss.Index, dict]:
    """The FAISS index of `cfg`'s kind over (N, D) vectors, and what search needs (`mips_norm2`, see `augment`);
    `saved` checkpoints a long build so that a rerun resumes it."""
    return kind_of(cfg).build(vectors, cfg, progress, saved=saved)


def set_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    kind_of(cfg).set_search(index, cfg)


class EmptyIndex(IndexFolderError):
    """Every passage of the index was deleted: nothing to retrieve until documents are added."""


class DenseIndex:
    """A built index folder opened for search. Opening maps the files; nothing large is read until searched.

    Rows are numbered across the generation's segments in order; rows of deleted or replaced documents stay in the
    files until `index_builder compact` and are masked out of every search.
    """

    def __init__(self, folder: str | Path, manifest: dict, index: faiss.Index, vectors, store: PassageStore | None,
                 cfg: IndexConfig, mips_norm2: float | None = None, deleted: np.ndarray | None = None,
                 bm25=None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.index = index
        self.vectors = vectors
        self.store = store
        self.cfg = cfg
        self.mips_norm2 = mips_norm2
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        self.generation = manifest.get("generation", 0)
        self.kind = kind_of(cfg)
        self.bm25 = bm25  # the folder's BM25 part (rag/retrieval/bm25.py), None when it has none
        self._params = self._search_params()

    @classmethod
    def load(cls, folder: str | Path | IndexFolder, verify: bool = False, **overrides) -> DenseIndex:
        """Open `folder` at its current generation; check it against its manifest (sizes; sha256 too with `verify`).

        `overrides` change search-time settings (ef_search, nprobe, rerank, use_gpu). A writer (update, compact)
        may switch the generation and remove the old one's files between our reading the manifest and opening
        them: then the new generation is opened instead."""
        where = folder if isinstance(folder, IndexFolder) else IndexFolder(folder)
        for attempt in range(RETRIES + 1):
            manifest = where.read_manifest()
            try:
                return cls._open_generation(where, manifest, verify, overrides)
            except IndexFolderError:
                moved = where.read_manifest().get("generation") != manifest.get("generation")
                if not moved or attempt == RETRIES:
                    raise
                log.info("%s switched to a new generation while it was being opened; opening that", where.path)
        raise AssertionError("unreachable")

    @classmethod
    def _open_generation(cls, where: IndexFolder, manifest: dict, verify: bool, overrides: dict) -> DenseIndex:
        where.check_files(manifest, verify)
        known = set(IndexConfig.__dataclass_fields__)
        params = {k: v for k, v in manifest["index"].items() if k in known}
        params.update(overrides)
        cfg = IndexConfig(**params)
        count, dim = manifest["count"], manifest["dim"]
        files = where.layout(manifest)

        parts = [_open(where.file(seg["vectors"]), map_rows) for seg in files["segments"]]
        vectors = parts[0] if len(parts) == 1 else SegmentedVectors(parts)
        if vectors.shape != (count, dim):
            raise IndexFolderError(f"{where.file(files['segments'][0]['vectors'])}: shape {vectors.shape}, "
                                   f"manifest says ({count}, {dim})")
        store = _open([where.file(seg["store"]) for seg in files["segments"]], PassageStore)
        if len(store) != count:
            raise IndexFolderError(f"{where.file(files['segments'][0]['store'])}: {len(store)} rows, "
                                   f"manifest says {count}")
        # Memory-map the index codes (flat and HNSW storage, IVF lists) so that opening costs no private memory.
        path = where.file(files["index_file"])
        index = _open(path, lambda p: faiss.read_index(str(p), kind_of(cfg).io_flags()))
        norm2 = manifest["index"].get("mips_norm2")
        if index.ntotal != count or index.d != dim + (norm2 is not None):
            raise IndexFolderError(f"{path}: {index.ntotal} vectors of dimension {index.d}, "
                                   f"manifest says {count} of {dim}")
        deleted = _open(where.file(files["deleted_file"]), np.load) if files["deleted_file"] else None
        set_search_params(index, cfg)
        if cfg.use_gpu:
            index = _to_gpu(index, cfg)
        bm25 = None
        if manifest.get("sparse"):
            from rag.retrieval.bm25 import Bm25Part

            bm25 = Bm25Part.load(where, manifest["sparse"], np.zeros(0, np.int64) if deleted is None else deleted)
        loaded = cls(where.path, manifest, index, vectors, store, cfg, norm2, deleted, bm25)
        loaded.probe(path)
        return loaded

    def probe(self, path: Path) -> None:
        """A cheap check at load that the FAISS file holds what the stored vectors hold: three of its vectors
        (flat, HNSW: read back with `reconstruct`, O(d) each) must equal the stored ones; IVF-PQ codes are lossy, so
        there three searches must give finite scores. A same-size corruption of the codes fails it; only
        `index_builder verify` (sha256 of every file) catches every changed byte."""
        if not len(self.vectors):
            return
        rows = np.setdiff1d(np.array([0, len(self.vectors) // 2, len(self.vectors) - 1]), self.deleted)
        if not len(rows):
            return
        stored = np.asarray(self.vectors[rows], np.float32)
        if self.kind.lossy:
            got = self.search(stored, 1, check=False).scores
            ok = np.isfinite(got).all()
        else:
            got = np.stack([self.index.reconstruct(int(i)) for i in rows])[:, : self.dim]
            ok = np.isfinite(got).all() and np.allclose(got, stored, rtol=1e-2, atol=1e-3)
        if not ok:
            raise IndexFolderError(f"{path}: its vectors disagree with the stored ones; the file is damaged, run "
                                   "`index_builder verify` and rebuild with --overwrite")

    def _search_params(self):
        """faiss search parameters that mask deleted rows (None when nothing is deleted)."""
        if not len(self.deleted):
            return None
        self._deleted_set = faiss.IDSelectorBatch(self.deleted)  # kept alive with the index
        self._selector = faiss.IDSelectorNot(self._deleted_set)
        return self.kind.search_params(self.cfg, self._selector)

    def __len__(self) -> int:
        """Searchable (live) passages."""
        return self.index.ntotal - len(self.deleted)

    def require_bm25(self, retrieval: str) -> None:
        """A BM25 setting over a folder without a BM25 part is an error that names the command adding it."""
        if self.bm25 is None:
            raise IndexFolderError(f"retrieval={retrieval} needs a BM25 part, and {self.folder} has none; add it with "
                                   f"`python -m index_builder update --index {self.folder} --set sparse.kind=bm25` "
                                   "(or build with --set sparse.kind=bm25)")

    def require_passages(self) -> None:
        """Retrieval over an emptied index is an error that says how to fill it (docs/failure-behaviour.md)."""
        if not len(self):
            raise EmptyIndex(f"{self.folder} has no passages to retrieve (every document was deleted); add "
                             f"documents with `python -m index_builder update --index {self.folder} --add FILE`")

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, queries: np.ndarray, k: int, return_vectors: bool = False, check: bool = True) -> SearchResult:
        """Top-k maximum inner product search for (Q, D) query vectors. A NaN or infinite score (damaged codes)
        is an IndexFolderError, never a ranking."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (Q, D)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {queries.shape[1]}, the index {self.dim}")
        k = min(k, len(self))
        if k <= 0:  # an emptied index (every document deleted): no hits, not a faiss assertion
            empty = np.zeros((len(queries), 0))
            return SearchResult(ids=empty.astype(np.int64), scores=empty.astype(np.float32),
                                vectors=np.zeros((len(queries), 0, self.dim), np.float32) if return_vectors else None)
        fetch = self.kind.candidates(k, self.cfg)
        extra = {"params": self._params} if self._params is not None else {}
        if self.mips_norm2 is None:
            scores, ids = self.index.search(queries, fetch, **extra)  # (Q, fetch)
        else:
            dist, ids = self.index.search(np.hstack([queries, np.zeros((len(queries), 1), np.float32)]), fetch,
                                          **extra)
            scores = (np.einsum("qd,qd->q", queries, queries)[:, None] + self.mips_norm2 - dist) / 2  # see augment
        vecs = None
        if fetch > k or return_vectors:
            vecs = self.gather(ids)  # (Q, fetch, D)
        if fetch > k:
            # Exact re-rank of the approximate candidates from the stored vectors.
            exact = np.einsum("qkd,qd->qk", vecs, queries)  # (Q, fetch)
            exact[ids < 0] = -np.inf
            top = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # (Q, k)
            ids = np.take_along_axis(ids, top, 1)
            scores = np.take_along_axis(exact, top, 1)
            vecs = np.take_along_axis(vecs, top[:, :, None], 1)  # (Q, k, D)
        if check and (not np.isfinite(scores[ids >= 0]).all() or (ids >= self.index.ntotal).any()):
            raise IndexFolderError(f"{self.folder}: the index returned scores {scores[0, :3].tolist()} for ids "
                                   f"{ids[0, :3].tolist()}; its FAISS file is damaged, run `index_builder verify` "
                                   "and rebuild with --overwrite")
        scores = np.where(ids < 0, -np.inf, scores)  # a missing hit (HNSW after deletions, IVF with few probes)
        return SearchResult(ids=ids.astype(np.int64), scores=scores.astype(np.float32),
                            vectors=vecs if return_vectors else None)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for (Q, k) row positions as (Q, k, D) float32; zeros where the id is -1."""
        flat = ids.reshape(-1)
        valid = flat >= 0
        out = np.zeros((flat.size, self.vectors.shape[1]), dtype=np.float32)
        uniq, inverse = np.unique(flat[valid], return_inverse=True)  # sorted reads from the memory map
        out[valid] = np.asarray(self.vectors[uniq], dtype=np.float32)[inverse]
        return out.reshape(*ids.shape, -1)

    def live_texts(self, chunk: int = 50_000):
        """The texts of the searchable passages, `chunk` rows at a time."""
        column = self.store.table.column("text")
        for start in range(0, len(self.store), chunk):
            texts = column.slice(start, chunk).to_pylist()
            if len(self.deleted):
                gone = self.deleted[(self.deleted >= start) & (self.deleted < start + len(texts))] - start
                keep = np.ones(len(texts), dtype=bool)
                keep[gone] = False
                texts = [t for t, k in zip(texts, keep, strict=True) if k]
            yield texts

    def passages(self, ids) -> list[PassageRecord | None]:
        """Passages (id, doc_id, title, text) at row positions; None for -1."""
        return self.store.rows(ids)


def _open(path, reader):
    """Read one file of the folder; a damaged file is an error that names it."""
    try:
        return reader(path)
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        name = ", ".join(map(str, path)) if isinstance(path, list) else str(path)
        raise IndexFolderError(f"{name}: cannot be read ({str(e).splitlines()[0][:200]}); the file is damaged, "
                               "rebuild the index with --overwrite") from None


def _to_gpu(index: faiss.Index, cfg: IndexConfig) -> faiss.Index:
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        log.warning("index.use_gpu is set but this faiss build has no GPU (install the 'gpu' extra); searching on CPU")
        return index
    if not kind_of(cfg).on_gpu:
        log.warning("faiss has no GPU %s; searching on CPU", cfg.type)
        return index
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True
    gpu = faiss.index_cpu_to_gpu(res, 0, index, co)
    gpu.referenced_resources = res  # keep the resources alive as long as the index
    return gpu
