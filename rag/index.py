"""The dense index: FAISS index + passage vectors + passage store of an index folder, opened for search.

The folder's format (manifest, file names, generations) belongs to `rag.index_folder.IndexFolder`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from rag.config import ConfigError, IndexConfig
from rag.index_folder import IndexFolder, IndexFolderError
from rag.passages import Passage
from rag.store import PassageStore, SegmentedVectors

log = logging.getLogger(__name__)

RETRIES = 3  # re-reads of the manifest when a writer switches generations while the index is being opened


@dataclass(frozen=True)
class SearchResult:
    ids: np.ndarray  # (Q, k) int64 row positions, -1 where fewer than k hits
    scores: np.ndarray  # (Q, k) float32 inner products d(z)ᵀq(x); -inf where the id is -1
    vectors: np.ndarray | None = None  # (Q, k, D) float32 stored d(z), on request (zeros where the id is -1)


def factory_string(cfg: IndexConfig) -> str:
    if cfg.type == "flat":
        return "Flat"
    if cfg.type == "hnsw":
        return f"HNSW{cfg.hnsw_m}"
    return f"IVF{cfg.nlist},PQ{cfg.pq_m}x{cfg.nbits}np"  # np: no polysemous training, unused by search


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def max_norm2(vectors: np.ndarray, chunk: int = 100_000) -> float:
    return max((float(np.einsum("nd,nd->n", c, c).max()) for c in (
        np.asarray(vectors[s:e], dtype=np.float32) for s, e in _chunks(len(vectors), chunk))), default=0.0)


def augment(x: np.ndarray, norm2: float | None) -> np.ndarray:
    """MIPS as nearest-neighbour search (Bachrach et al. 2014, as in DPR's HNSW indexer): a passage gets an extra
    coordinate sqrt(M² - |d|²) and a query a 0, so that |q - d|² = |q|² + M² - 2 dᵀq ranks like -dᵀq.
    HNSW's graph is built for a metric; searched by raw inner product it loses much recall on unnormalised vectors."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # (N, D)
    if norm2 is None:
        return x
    extra = np.sqrt(np.maximum(norm2 - np.einsum("nd,nd->n", x, x), 0.0))  # (N,)
    return np.hstack([x, extra[:, None]])  # (N, D+1)


def build_faiss(vectors: np.ndarray, cfg: IndexConfig, progress: bool = True,
                chunk: int = 20_000) -> tuple[faiss.Index, dict]:
    """A FAISS index for maximum inner product over (N, D) vectors read in chunks (the array may be a memory map).

    Returns the index and what search needs to know about it (`mips_norm2` for HNSW, see `augment`).
    """
    n, dim = vectors.shape
    if cfg.type == "ivfpq":
        if dim % cfg.pq_m:
            raise ConfigError(f"index.pq_m={cfg.pq_m} must divide the dimension {dim}")
        if n < cfg.nlist:
            raise ConfigError(f"index.nlist={cfg.nlist} needs at least that many passages (have {n}); lower it")
    norm2 = max_norm2(vectors) if cfg.type == "hnsw" else None
    if norm2 is not None:
        index = faiss.index_factory(dim + 1, factory_string(cfg), faiss.METRIC_L2)
        index.hnsw.efConstruction = cfg.ef_construction
    else:
        index = faiss.index_factory(dim, factory_string(cfg), faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
        log.info("training %s on %d vectors", factory_string(cfg), len(sample))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    bar = tqdm(total=n, unit="vec", desc=f"index {cfg.type}", disable=not progress)
    for start, stop in _chunks(n, chunk):
        index.add(augment(vectors[start:stop], norm2))
        bar.update(stop - start)
    bar.close()
    return index, {"mips_norm2": norm2}


def set_search_params(index: faiss.Index, cfg: IndexConfig) -> None:
    if cfg.type == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = cfg.ef_search
    elif cfg.type == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = cfg.nprobe


class EmptyIndex(IndexFolderError):
    """Every passage of the index was deleted: nothing to retrieve until documents are added."""


class DenseIndex:
    """A built index folder opened for search. Opening maps the files; nothing large is read until searched.

    Rows are numbered across the generation's segments in order; rows of deleted or replaced documents stay in the
    files until `index_builder compact` and are masked out of every search.
    """

    def __init__(self, folder: str | Path, manifest: dict, index: faiss.Index, vectors, store: PassageStore | None,
                 cfg: IndexConfig, mips_norm2: float | None = None, deleted: np.ndarray | None = None):
        self.folder = Path(folder)
        self.manifest = manifest
        self.index = index
        self.vectors = vectors
        self.store = store
        self.cfg = cfg
        self.mips_norm2 = mips_norm2
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        self.generation = manifest.get("generation", 0)
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

        parts = [_open(where.file(seg["vectors"]), lambda p: np.load(p, mmap_mode="r")) for seg in files["segments"]]
        vectors = parts[0] if len(parts) == 1 else SegmentedVectors(parts)
        if vectors.shape != (count, dim):
            raise IndexFolderError(f"{where.file(files['segments'][0]['vectors'])}: shape {vectors.shape}, "
                                   f"manifest says ({count}, {dim})")
        store = _open([where.file(seg["store"]) for seg in files["segments"]], PassageStore)
        if len(store) != count:
            raise IndexFolderError(f"{where.file(files['segments'][0]['store'])}: {len(store)} rows, "
                                   f"manifest says {count}")
        # Memory-map the index codes (flat and HNSW storage) so that opening costs no resident memory.
        path = where.file(files["index_file"])
        index = _open(path, lambda p: faiss.read_index(str(p), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY))
        norm2 = manifest["index"].get("mips_norm2")
        if index.ntotal != count or index.d != dim + (norm2 is not None):
            raise IndexFolderError(f"{path}: {index.ntotal} vectors of dimension {index.d}, "
                                   f"manifest says {count} of {dim}")
        deleted = _open(where.file(files["deleted_file"]), np.load) if files["deleted_file"] else None
        set_search_params(index, cfg)
        if cfg.use_gpu:
            index = _to_gpu(index, cfg)
        loaded = cls(where.path, manifest, index, vectors, store, cfg, norm2, deleted)
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
        if self.cfg.type == "ivfpq":
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
        sel = faiss.IDSelectorNot(self._deleted_set)
        self._selector = sel
        if self.cfg.type == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.cfg.ef_search)
        if self.cfg.type == "ivfpq":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.cfg.nprobe)
        return faiss.SearchParameters(sel=sel)

    def __len__(self) -> int:
        """Searchable (live) passages."""
        return self.index.ntotal - len(self.deleted)

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
        fetch = max(k, self.cfg.rerank) if self.cfg.type != "flat" else k
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

    def passages(self, ids) -> list[Passage | None]:
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
    if cfg.type == "hnsw":
        log.warning("faiss has no GPU HNSW; searching on CPU")
        return index
    res = faiss.StandardGpuResources()
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True
    gpu = faiss.index_cpu_to_gpu(res, 0, index, co)
    gpu.referenced_resources = res  # keep the resources alive as long as the index
    return gpu
