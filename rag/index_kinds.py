"""The kinds of dense index, each one small class registered in one place (`KINDS`).

A kind says how its FAISS index is described (a factory string, as faiss's `index_factory` reads it), built
(trained on a sample, then filled in chunks), searched (its parameters, and how many approximate candidates an
exact re-rank reads), whether faiss has it on the GPU, and what an update may reuse. Nothing else in the project
switches on a kind's name: adding a kind is one new class and one line in `KINDS` (tests register one).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from rag.errors import ConfigError

if TYPE_CHECKING:  # faiss is imported where an index is made or searched: rag.config reads KINDS without it
    import faiss

log = logging.getLogger(__name__)


def chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def max_norm2(vectors: np.ndarray, chunk: int = 100_000) -> float:
    return max((float(np.einsum("nd,nd->n", c, c).max()) for c in (
        np.asarray(vectors[s:e], dtype=np.float32) for s, e in chunks(len(vectors), chunk))), default=0.0)


def augment(x: np.ndarray, norm2: float | None) -> np.ndarray:
    """MIPS as nearest-neighbour search (Bachrach et al. 2014, as in DPR's HNSW indexer): a passage gets an extra
    coordinate sqrt(M² - |d|²) and a query a 0, so that |q - d|² = |q|² + M² - 2 dᵀq ranks like -dᵀq.
    HNSW's graph is built for a metric; searched by raw inner product it loses much recall on unnormalised vectors."""
    x = np.ascontiguousarray(x, dtype=np.float32)  # (N, D)
    if norm2 is None:
        return x
    extra = np.sqrt(np.maximum(norm2 - np.einsum("nd,nd->n", x, x), 0.0))  # (N,)
    return np.hstack([x, extra[:, None]])  # (N, D+1)


class IndexKind:
    """Exact inner-product search over every vector (faiss `Flat`): the reference the others are measured by.

    Every method's `cfg` is the index's `rag.config.IndexConfig` (not imported here: rag.config reads `KINDS`)."""

    name = "flat"
    on_gpu = True  # faiss can move it to a GPU
    keeps_training = False  # an update or compaction may keep its trained parts (a quantiser, codebooks)
    approximate = False  # its scores are not the exact dᵀq: re-rank from the stored vectors
    lossy = False  # its codes cannot give back the stored vectors (the load-time probe searches instead)

    def factory(self, cfg) -> str:
        return "Flat"

    def check(self, n: int, dim: int, cfg) -> None:
        """Refuse settings that cannot build over n vectors of dimension dim."""

    def uses_mips_transform(self) -> bool:
        return False

    def build(self, vectors: np.ndarray, cfg, progress: bool = True, chunk: int = 20_000,
              saved: Checkpoints | None = None) -> tuple[faiss.Index, dict]:
        """The index over (N, D) vectors read in chunks (the array may be a memory map or a `rag.files.NpyRows`),
        and what search needs to know about it (`mips_norm2` for the MIPS transform, see `augment`). With `saved`,
        the trained index and the filling so far are checkpointed there, and a rerun resumes from them: the result
        equals an uninterrupted build (training and each add are deterministic)."""
        import faiss
        from tqdm.auto import tqdm

        n, dim = vectors.shape
        self.check(n, dim, cfg)
        index, norm2, done = saved.resume() if saved is not None else (None, None, 0)
        if index is None:
            norm2 = max_norm2(vectors) if self.uses_mips_transform() else None
            metric = faiss.METRIC_L2 if norm2 is not None else faiss.METRIC_INNER_PRODUCT
            index = faiss.index_factory(dim + (norm2 is not None), self.factory(cfg), metric)
            self.configure(index, cfg)
            if not index.is_trained:
                rng = np.random.default_rng(cfg.seed)
                sample = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
                log.info("training %s on %d vectors", self.factory(cfg), len(sample))
                t = time.perf_counter()
                index.train(augment(vectors[sample], norm2))
                log.info("trained in %.0f s", time.perf_counter() - t)
                if saved is not None:
                    saved.trained(index, norm2, time.perf_counter() - t)
        self.configure_add(index, cfg)
        bar = tqdm(total=n, initial=done, unit="vec", desc=f"index {self.name}", disable=not progress)
        for start, stop in chunks(n, chunk):
            if stop <= done:
                continue
            index.add(augment(vectors[start:stop], norm2))
            bar.update(stop - start)
            if saved is not None and saved.due(stop, n):
                saved.filled(index, norm2, stop)
        bar.close()
        return index, {"mips_norm2": norm2}

    @staticmethod
    def io_flags() -> int:
        """How a folder's index file is read for search: memory-mapped (flat and HNSW codes) so that opening costs
        no private memory and processes share the page cache."""
        import faiss

        return faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY

    def configure(self, index: faiss.Index, cfg) -> None:
        """Build-time settings on a fresh index."""

    def configure_add(self, index: faiss.Index, cfg) -> None:
        """Settings for adding vectors (also on an index read back from a checkpoint)."""

    def set_search(self, index: faiss.Index, cfg) -> None:
        """Search-time settings on a loaded index."""

    def search_params(self, cfg, selector) -> faiss.SearchParameters:
        """Parameters of one search that skips the rows `selector` excludes (deleted passages)."""
        import faiss

        return faiss.SearchParameters(sel=selector)

    def candidates(self, k: int, cfg) -> int:
        """How many hits to ask faiss for so that an exact re-rank can pick the top k; a re-rank of fewer
        candidates than k (which would silently re-rank nothing) is refused."""
        check_rerank(k, cfg, self)
        return max(k, cfg.rerank) if self.approximate else k


def check_rerank(k: int, cfg, kind: IndexKind | None = None, what: str = "k") -> None:
    """index.rerank (when on) must be at least the k searched for: fewer candidates than k re-rank nothing."""
    if (kind or kind_of(cfg)).approximate and 0 < cfg.rerank < k:
        raise ConfigError(f"index.rerank={cfg.rerank} is below {what}={k}: re-rank at least as many candidates as "
                          f"passages asked for (set index.rerank >= {k}, or 0 for no re-rank)")


class HNSW(IndexKind):
    """A graph over the vectors with the MIPS transform (`augment`), as DPR's HNSW indexer; CPU only in faiss."""

    name = "hnsw"
    on_gpu = False
    approximate = True

    def factory(self, cfg) -> str:
        return f"HNSW{cfg.hnsw_m}"

    def uses_mips_transform(self) -> bool:
        return True

    def configure(self, index: faiss.Index, cfg) -> None:
        index.hnsw.efConstruction = cfg.ef_construction

    def set_search(self, index: faiss.Index, cfg) -> None:
        import faiss

        faiss.downcast_index(index).hnsw.efSearch = cfg.ef_search

    def search_params(self, cfg, selector) -> faiss.SearchParameters:
        import faiss

        return faiss.SearchParametersHNSW(sel=selector, efSearch=cfg.ef_search)


class IVFPQ(IndexKind):
    """Inverted lists over product-quantised codes: a few bytes a passage, trained on a sample; an update keeps the
    trained quantiser and codebooks."""

    name = "ivfpq"
    keeps_training = True
    approximate = True
    lossy = True

    def factory(self, cfg) -> str:
        # coarse=hnsw: the nlist centroids are searched through an HNSW graph (as transformers' compressed wiki_dpr
        # index): assigning 21M vectors to 16,384 centroids takes a third of the flat quantiser's time.
        coarse = f"_HNSW{COARSE_HNSW_M}" if cfg.coarse == "hnsw" else ""
        rotate = f"OPQ{cfg.pq_m}," if cfg.opq else ""
        # np: no polysemous training (unused by search)
        return f"{rotate}IVF{cfg.nlist}{coarse},PQ{cfg.pq_m}x{cfg.nbits}np"

    def configure_add(self, index: faiss.Index, cfg) -> None:
        _coarse_ef(index, COARSE_EF_ADD)

    @staticmethod
    def io_flags() -> int:
        """The inverted lists memory-mapped (faiss reads them as OnDiskInvertedLists): a 21M-passage index opens
        with no private copy of its 1.4 GB of codes, and several processes share them in the page cache."""
        import faiss

        return faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY

    def check(self, n: int, dim: int, cfg) -> None:
        if dim % cfg.pq_m:
            raise ConfigError(f"index.pq_m={cfg.pq_m} must divide the dimension {dim}")
        if n < cfg.nlist:
            raise ConfigError(f"index.nlist={cfg.nlist} needs at least that many passages (have {n}); lower it")

    def set_search(self, index: faiss.Index, cfg) -> None:
        import faiss

        faiss.extract_index_ivf(index).nprobe = cfg.nprobe
        _coarse_ef(index, max(cfg.nprobe, COARSE_EF_ADD))

    def search_params(self, cfg, selector) -> faiss.SearchParameters:
        import faiss

        return faiss.SearchParametersIVF(sel=selector, nprobe=cfg.nprobe)


def coarse_space(index: faiss.Index, x: np.ndarray) -> np.ndarray:
    """(N, D) vectors as an IVF index's coarse quantiser sees them: through its pre-transforms (OPQ's rotation)."""
    import faiss

    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
    return x


COARSE_HNSW_M = 32  # links per centroid in an HNSW coarse quantiser
COARSE_EF_ADD = 16  # its search breadth when assigning: 99.6% of assignments equal the flat quantiser's


def _coarse_ef(index: faiss.Index, ef: int) -> None:
    """The search breadth of an HNSW coarse quantiser (nothing for a flat one)."""
    import faiss

    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = ef


class Checkpoints:
    """Where a long index build keeps its progress (index_builder's build and import give one): `resume` gives back
    (index, mips_norm2, rows added) or (None, None, 0); `trained` and `filled` save; `due` says when to save."""

    def resume(self) -> tuple[faiss.Index | None, float | None, int]:
        return None, None, 0

    def trained(self, index: faiss.Index, norm2: float | None, seconds: float) -> None:
        pass

    def due(self, rows: int, total: int) -> bool:
        return False

    def filled(self, index: faiss.Index, norm2: float | None, rows: int) -> None:
        pass


KINDS: dict[str, IndexKind] = {kind.name: kind for kind in (IndexKind(), HNSW(), IVFPQ())}


def kind_of(cfg) -> IndexKind:
    """The kind an index config names; an unknown name is an error listing the known ones."""
    try:
        return KINDS[cfg.type]
    except KeyError:
        raise ConfigError(f"index.type: {cfg.type!r} is not an index kind; known: {', '.join(sorted(KINDS))}") \
            from None
