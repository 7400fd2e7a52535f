"""BM25 over an index folder's passages: the sparse part of the folder, built beside the dense part in every
generation (bm25s, with PyStemmer's Snowball stemmers), memory-mapped on load, searched alone (RAG-BM25, the
paper's Table 6) or fused with the dense part (rag/retrieval/fusion.py).

Its rows are the dense part's rows (row position = passage), so a deleted passage is masked out of BM25 exactly as
out of FAISS, and an update rebuilds the part over the generation's passages. What makes a query's tokens
comparable with the passages' (stemmer language, stopwords, lower-casing) is recorded in the manifest; queries are
tokenised from that record, never from a config that could disagree with it.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rag.config import ConfigError, SparseConfig
from rag.retrieval.index_folder import IndexFolder, IndexFolderError

log = logging.getLogger(__name__)

PARTS = ("data", "indices", "indptr", "vocab", "params", "nnoc")  # the files bm25s writes (nnoc: some methods)
SUFFIX = {"data": "npy", "indices": "npy", "indptr": "npy", "vocab": "json", "params": "json", "nnoc": "npy"}


def file_names(generation: int) -> dict[str, str]:
    """The part's file names in a generation: bm25.data.npy in generation 0, bm25.g0003.data.npy in 3."""
    tag = "" if generation == 0 else f".g{generation:04d}"
    return {part: f"bm25{tag}.{part}.{SUFFIX[part]}" for part in PARTS}


def config_of(record: dict) -> SparseConfig:
    """The settings a manifest's `sparse` record was built with (to build the next generation alike)."""
    return SparseConfig(**{k: v for k, v in record.items() if k in SparseConfig.__dataclass_fields__})


def stemmer(language: str):
    """PyStemmer's Snowball stemmer for `language` ("none": no stemming); an unknown language lists the known."""
    if language == "none":
        return None
    try:
        import Stemmer
    except ImportError:
        raise ConfigError("BM25 needs bm25s and PyStemmer: pip install bm25s PyStemmer") from None
    if language not in Stemmer.algorithms():
        raise ConfigError(f"sparse.language: {language!r} has no stemmer; known: {', '.join(Stemmer.algorithms())} "
                          "(or none)")
    return Stemmer.Stemmer(language)


@functools.cache
def _bm25s():
    """The bm25s module, its logger handed back to the logging config once: bm25s sets it to DEBUG when imported, so
    every build printed "Building index from IDs objects" whatever level a program had chosen. Cached: a search
    tokenises every question through here, and setLevel clears the cache of every logger."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


def tokenize(texts: list[str], record: dict, stem, as_ids: bool):
    """bm25s tokens of `texts` under the record's stopwords and the stemmer `stem` (of the record's language)."""
    bm25s = _bm25s()
    stop = record["stopwords"]
    return bm25s.tokenize(texts, lower=True, stopwords=None if stop == "none" else stop, stemmer=stem,
                          return_ids=as_ids, show_progress=False)


def passage_texts(titles: list[str], texts: list[str]) -> list[str]:
    """What BM25 indexes of a passage: its title and its text (the dense side encodes the same pair)."""
    return [f"{t}. {x}" if t else x for t, x in zip(titles, texts, strict=True)]


def build(where: IndexFolder, generation: int, titles: list[str], texts: list[str], cfg: SparseConfig,
          progress: bool = False) -> dict:
    """Index the passages and write the part's files into the folder; returns the manifest's `sparse` record."""
    bm25s = _bm25s()
    record = {"kind": "bm25", **asdict(cfg)}
    stem = stemmer(cfg.language)  # an unknown language fails before any work
    retriever = bm25s.BM25(k1=cfg.k1, b=cfg.b)
    retriever.index(tokenize(passage_texts(titles, texts), record, stem, as_ids=True), show_progress=progress)
    names = file_names(generation)
    # bm25s writes by path: into a fresh folder of our own, then each file renamed into place (a link planted under
    # one of these names is replaced, never written through)
    staging = Path(tempfile.mkdtemp(prefix=".bm25-", suffix=".tmp", dir=where.path))
    try:
        retriever.save(str(staging), **{f"{p}_name": n for p, n in names.items()},
                       **_quiet(retriever.save, show_progress=False))
        written = {p: n for p, n in names.items() if (staging / n).is_file()}
        for name in written.values():
            os.replace(staging / name, where.path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {**record, "files": written, "rows": len(texts)}


def _quiet(function, **settings) -> dict:
    """The progress and verbosity settings this bm25s's `function` takes (older versions take fewer)."""
    import inspect

    known = inspect.signature(function).parameters
    return {k: v for k, v in settings.items() if k in known}


class Bm25Part:
    """The sparse part of a loaded generation: BM25 scores over the same rows as the dense part."""

    def __init__(self, retriever, record: dict, deleted: np.ndarray):
        self.retriever, self.record = retriever, record
        self.stem = stemmer(record["language"])  # once per loaded part, not per search
        self.live = np.ones(record["rows"], dtype=np.float32)  # bm25s' weight mask: 0 drops a passage
        self.live[deleted] = 0.0

    @classmethod
    def load(cls, where: IndexFolder, record: dict, deleted: np.ndarray) -> Bm25Part:
        bm25s = _bm25s()
        names = {f"{p}_name": where.file(n).name for p, n in record["files"].items()}
        try:
            retriever = bm25s.BM25.load(str(where.path), **names, mmap=True,
                                        **_quiet(bm25s.BM25.load, show_progress=False, verbosity=0))
        except (OSError, ValueError, KeyError) as e:
            raise IndexFolderError(f"{where.path}: its BM25 files cannot be read ({str(e)[:200]}); rebuild the "
                                   "index with --overwrite") from None
        return cls(retriever, record, deleted)

    def search(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) row positions and BM25 scores, best first; -1 and -inf where fewer than k passages share a term
        with the question."""
        k = min(k, int(self.live.sum()))
        if k <= 0:
            empty = np.zeros((len(questions), 0))
            return empty.astype(np.int64), empty.astype(np.float32)
        tokens = tokenize(questions, self.record, self.stem, as_ids=False)
        ids, scores = self.retriever.retrieve(tokens, k=k, weight_mask=self.live, show_progress=False)
        ids, scores = np.asarray(ids, np.int64), np.asarray(scores, np.float32)  # (Q, k)
        miss = scores <= 0  # no query term in the passage: not a hit
        return np.where(miss, -1, ids), np.where(miss, -np.inf, scores).astype(np.float32)
