"""The kinds of dense index, each one small class registered in one place (`KINDS`).

A kind says how its FAISS index is described (a factory string, as faiss's `index_factory` reads it), built
(trained on a sample, then filled in chunks), searched (its parameters, and how many approximate candidates an
exact re-rank reads), whether faiss has it on the GPU, and what an update may reuse. Nothing else in the project
switches on a kind's name: adding a kind is one new class and one line in `KINDS` (tests register one).
"""

from __future__ import annotations

import logging
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

    def build(self, vectors: np.ndarray, cfg, progress: bool = True,
              chunk: int = 20_000) -> tuple[faiss.Index, dict]:
        """The index over (N, D) vectors read in chunks (the array may be a memory map), and what search needs to
        know about it (`mips_norm2` for the MIPS transform, see `augment`)."""
        import faiss
        from tqdm.auto import tqdm

        n, dim = vectors.shape
        self.check(n, dim, cfg)
        norm2 = max_norm2(vectors) if self.uses_mips_transform() else None
        metric = faiss.METRIC_L2 if norm2 is not None else faiss.METRIC_INNER_PRODUCT
        index = faiss.index_factory(dim + (norm2 is not None), self.factory(cfg), metric)
        self.configure(index, cfg)
        if not index.is_trained:
            rng = np.random.default_rng(cfg.seed)
            sample = np.sort(rng.choice(n, size=min(n, cfg.train_size), replace=False))
            log.info("training %s on %d vectors", self.factory(cfg), len(sample))
            index.train(augment(vectors[sample], norm2))
        bar = tqdm(total=n, unit="vec", desc=f"index {self.name}", disable=not progress)
        for start, stop in chunks(n, chunk):
            index.add(augment(vectors[start:stop], norm2))
            bar.update(stop - start)
        bar.close()
        return index, {"mips_norm2": norm2}

    def configure(self, index: faiss.Index, cfg) -> None:
        """Build-time settings on a fresh index."""

    def set_search(self, index: faiss.Index, cfg) -> None:
        """Search-time settings on a loaded index."""

    def search_params(self, cfg, selector) -> faiss.SearchParameters:
        """Parameters of one search that skips the rows `selector` excludes (deleted passages)."""
        import faiss

        return faiss.SearchParameters(sel=selector)

    def candidates(self, k: int, cfg) -> int:
        """How many hits to ask faiss for so that an exact re-rank can pick the top k."""
        return max(k, cfg.rerank) if self.approximate else k


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
        return f"IVF{cfg.nlist},PQ{cfg.pq_m}x{cfg.nbits}np"  # np: no polysemous training, unused by search

    def check(self, n: int, dim: int, cfg) -> None:
        if dim % cfg.pq_m:
            raise ConfigError(f"index.pq_m={cfg.pq_m} must divide the dimension {dim}")
        if n < cfg.nlist:
            raise ConfigError(f"index.nlist={cfg.nlist} needs at least that many passages (have {n}); lower it")

    def set_search(self, index: faiss.Index, cfg) -> None:
        import faiss

        faiss.extract_index_ivf(index).nprobe = cfg.nprobe

    def search_params(self, cfg, selector) -> faiss.SearchParameters:
        import faiss

        return faiss.SearchParametersIVF(sel=selector, nprobe=cfg.nprobe)


KINDS: dict[str, IndexKind] = {kind.name: kind for kind in (IndexKind(), HNSW(), IVFPQ())}


def kind_of(cfg) -> IndexKind:
    """The kind an index config names; an unknown name is an error listing the known ones."""
    try:
        return KINDS[cfg.type]
    except KeyError:
        raise ConfigError(f"index.type: {cfg.type!r} is not an index kind; known: {', '.join(sorted(KINDS))}") \
            from None
