"""The retriever: BERT_q encodes questions, the dense index returns the top-k passages, and the doc scores
d(z)ᵀq(x) are recomputed from the stored passage vectors so that they are differentiable in BERT_q."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rag.config import EncoderConfig, FusionConfig, RagConfig
from rag.errors import BadInput, BadType, RagError
from rag.index_kinds import check_rerank
from rag.retrieval.encoders import Encoder, encoder_record
from rag.retrieval.fusion import fuse, in_dense_units
from rag.retrieval.index import DenseIndex
from rag.retrieval.index_folder import IndexFolder
from rag.retrieval.passages import PassageRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retrieved:
    ids: np.ndarray  # (B, K) row positions in the index
    doc_scores: torch.Tensor  # (B, K) d(z)ᵀq(x) (or the BM25 / fused score), differentiable in BERT_q if dense
    passages: list[list[PassageRecord]]  # (B, K)
    ranks: np.ndarray | None = None  # (B, K, 2) 1-based rank on the dense and the BM25 side; 0: not found there
    # (B, K) d(z)ᵀq(x) of these passages, differentiable in BERT_q (None with retrieval bm25): what distant
    # supervision trains BERT_q on, whichever side found the passages (hybrid: BM25's hard negatives)
    dense_scores: torch.Tensor | None = None
    # what the reader reads instead of each question (query_translation.reader: both, or the translation alone)
    read: list[str] | None = None


class NonFinite(RagError):
    """A model produced NaN or infinite values: its weights are damaged."""


def check_questions(questions) -> list[str]:
    if isinstance(questions, str):
        questions = [questions]
    out = []
    for q in questions:
        if not isinstance(q, str):
            raise BadType(f"a question must be a string, got {type(q).__name__}")
        if not q.strip():
            raise BadInput("the question is empty; ask something")
        try:
            q.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: invalid UTF-8 bytes on a command line
            raise BadInput(f"the question is not valid text (character {e.start}: {q[e.start]!r}, from bytes "
                           "that are not UTF-8?); ask in UTF-8") from None
        out.append(q.strip())
    if not out:
        raise BadInput("no questions given; pass at least one")
    return out


class Retriever(nn.Module):
    """BERT_q and the index: dense retrieval, BM25 alone (the paper's RAG-BM25) or both fused (hybrid)."""

    def __init__(self, encoder: Encoder, index: DenseIndex, retrieval: str = "dense",
                 fusion: FusionConfig | None = None, bm25_scale: float = 0.05, translator=None,
                 reader: str = "question"):
        super().__init__()
        self.translator = translator  # rag.translate.Translator: translate-test, or None
        self.reader = reader if translator is not None else "question"  # query_translation.reader
        self.encoder = encoder
        self.index = index
        self.retrieval, self.fusion, self.bm25_scale = retrieval, fusion or FusionConfig(), bm25_scale
        self._warned_long = False
        if retrieval != "dense":
            index.require_bm25(retrieval)

    @classmethod
    def load(cls, cfg: RagConfig, precision: str) -> tuple[Retriever, EncoderConfig]:
        """The index folder `cfg.index` and BERT_q (`cfg.query_encoder`, or the index's own encoder as its manifest
        records it), checked against each other: n_docs within the re-rank before any weights load, then the
        encoder's identity. Returns the retriever and the query encoder's config."""
        translator = None
        if cfg.query_translation.source:  # checked here, before any weights load; the model loads on first use
            from rag.translate import Translator

            translator = Translator(cfg.query_translation.source, "en", cfg.query_translation.model, cfg.device,
                                    precision, keys=("query_translation.source", "query_translation.model"))
        index = DenseIndex.load(cfg.index, **({"use_gpu": True} if cfg.faiss_gpu else {}))
        check_rerank(cfg.n_docs, index.cfg, what="n_docs")
        qcfg = cfg.query_encoder or EncoderConfig(**encoder_record_of(index.manifest))
        encoder = Encoder.from_config(dataclasses.replace(qcfg, device=cfg.device, precision=precision))
        IndexFolder(index.folder).check_encoder(index.manifest, encoder.identity())
        return cls(encoder, index, cfg.retrieval, cfg.fusion, cfg.bm25_scale, translator,
                   cfg.query_translation.reader), qcfg

    def searched(self, questions: list[str]) -> tuple[list[str], list[str] | None]:
        """What is searched for each question (itself, or with `query_translation` itself and its English) and what
        the reader reads instead of it (None: the question as asked)."""
        if self.translator is None:
            return questions, None
        english = self.translator(questions)
        both = [f"{q} / {t}" if t else q for q, t in zip(questions, english, strict=True)]
        read = {"both": both, "translation": [t or q for q, t in zip(questions, english, strict=True)]}
        return both, read.get(self.reader)

    def encode(self, questions: list[str]) -> torch.Tensor:
        """(B,) questions -> (B, D) q(x), in one encoder pass; over-long questions are truncated with one warning."""
        if self.encoder.cfg.question_mark:
            questions = [q if q.rstrip().endswith("?") else q.rstrip() + "?" for q in questions]
        limit = self.encoder.max_length
        if not self._warned_long:
            lengths = self.encoder.token_counts(questions, query=True)
            if max(lengths) > limit:
                log.warning("a question of %d tokens was truncated to the query encoder's limit of %d",
                            max(lengths), limit)
                self._warned_long = True
        enc = self.encoder.tokenize(questions, query=True)
        enc = {k: v.to(self.encoder.device) for k, v in enc.items()}
        q = self.encoder(**enc)
        if not torch.isfinite(q).all():
            raise NonFinite("the query encoder gave NaN or infinite vectors; its weights are damaged (a diverged "
                            "training run?): load another checkpoint or retrain")
        return q

    def forward(self, questions: list[str], k: int) -> Retrieved:
        index = self.index  # one generation for the whole call, even if reload_index swaps it meanwhile
        index.require_passages()
        if k > len(index):
            log.warning("n_docs=%d is larger than the index (%d passages); using %d", k, len(index), len(index))
            k = len(index)
        searched, read = self.searched(questions)
        return dataclasses.replace(self._search(index, searched, k), read=read)

    def _search(self, index: DenseIndex, questions: list[str], k: int) -> Retrieved:
        if self.retrieval == "bm25":
            return self._bm25(index, questions, k)
        q = self.encode(questions)  # (B, D)
        if self.retrieval == "hybrid":
            return self._hybrid(index, questions, q, k)
        hits = index.search(q.detach().float().cpu().numpy(), k, return_vectors=True)  # one batched search
        ranks = np.stack([np.where(hits.ids >= 0, np.arange(1, hits.ids.shape[1] + 1), 0),
                          np.zeros_like(hits.ids)], -1)  # (B, K, 2)
        dq = self._dense_scores(hits.vectors, q)  # (B, K)
        return self._retrieved(index, hits.ids, dq, ranks, dq)

    def _bm25(self, index: DenseIndex, questions: list[str], k: int) -> Retrieved:
        """RAG-BM25: the prior from the scaled BM25 scores; BERT_q takes no part."""
        ids, scores = index.bm25.search(questions, k)  # (B, K)
        ranks = np.stack([np.zeros_like(ids), np.where(ids >= 0, np.arange(1, ids.shape[1] + 1), 0)], -1)
        doc_scores = torch.from_numpy(scores * self.bm25_scale).to(self.encoder.device)  # -inf where no hit
        return self._retrieved(index, ids, doc_scores, ranks)

    def _hybrid(self, index: DenseIndex, questions: list[str], q: torch.Tensor, k: int) -> Retrieved:
        """Both sides' top `fusion.depth` candidates fused; the prior is over the fused scores, and the gradient
        reaches BERT_q through d(z)ᵀq(x) of the fused passages (a straight-through term of value 0)."""
        f = self.fusion
        dense = index.search(q.detach().float().cpu().numpy(), f.depth)
        sparse_ids, sparse_scores = index.bm25.search(questions, f.depth)
        fused = fuse(dense.ids, dense.scores, sparse_ids, sparse_scores, k, f.method, f.bm25_weight, f.rrf_k)
        dq = self._dense_scores(index.gather(fused.ids), q)  # (B, K)
        scores = in_dense_units(fused, dense.scores, f.method, f.bm25_weight, f.rrf_k, f.depth)  # (B, K)
        doc_scores = torch.from_numpy(scores).to(dq.device, dq.dtype) + (dq - dq.detach())
        return self._retrieved(index, fused.ids, doc_scores, fused.ranks, dq)

    @staticmethod
    def _dense_scores(vectors: np.ndarray, q: torch.Tensor) -> torch.Tensor:
        d = torch.from_numpy(vectors).to(q.device, q.dtype)  # (B, K, D) stored d(z)
        return torch.einsum("bkd,bd->bk", d, q)  # (B, K)

    @staticmethod
    def _retrieved(index: DenseIndex, ids: np.ndarray, doc_scores: torch.Tensor, ranks: np.ndarray,
                   dense: torch.Tensor | None = None) -> Retrieved:
        missing = torch.from_numpy(ids < 0).to(doc_scores.device)  # (B, K) no hit: masked out of every softmax
        if missing.any():
            doc_scores = doc_scores.masked_fill(missing, float("-inf"))
            dense = None if dense is None else dense.masked_fill(missing, float("-inf"))
        return Retrieved(ids, doc_scores, [index.passages(row) for row in ids], ranks, dense)


def encoder_record_of(manifest: dict) -> dict:
    """The EncoderConfig fields an index's manifest records of its encoder."""
    keys = encoder_record(EncoderConfig()).keys()
    return {k: manifest["encoder"][k] for k in keys if k in manifest["encoder"]}
