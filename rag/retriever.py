"""The retriever: BERT_q encodes questions, the dense index returns the top-k passages, and the doc scores
d(z)ᵀq(x) are recomputed from the stored passage vectors so that they are differentiable in BERT_q."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rag.encoders import Encoder
from rag.errors import BadInput, BadType, RagError
from rag.index import DenseIndex
from rag.passages import Passage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retrieved:
    ids: np.ndarray  # (B, K) row positions in the index
    doc_scores: torch.Tensor  # (B, K) d(z)ᵀq(x), differentiable in BERT_q when gradients are on
    passages: list[list[Passage]]  # (B, K)


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
    def __init__(self, encoder: Encoder, index: DenseIndex):
        super().__init__()
        self.encoder = encoder
        self.index = index
        self._warned_long = False

    def encode(self, questions: list[str]) -> torch.Tensor:
        """(B,) questions -> (B, D) q(x), in one encoder pass; over-long questions are truncated with one warning."""
        if self.encoder.cfg.question_mark:
            questions = [q if q.rstrip().endswith("?") else q.rstrip() + "?" for q in questions]
        limit = self.encoder.max_length
        if not self._warned_long:
            lengths = [len(x) for x in self.encoder.tokenizer(questions)["input_ids"]]
            if max(lengths) > limit:
                log.warning("a question of %d tokens was truncated to the query encoder's limit of %d",
                            max(lengths), limit)
                self._warned_long = True
        enc = self.encoder.tokenize(questions)
        enc = {k: v.to(self.encoder.device) for k, v in enc.items()}
        return self.encoder(**enc)

    def forward(self, questions: list[str], k: int) -> Retrieved:
        index = self.index  # one generation for the whole call, even if reload_index swaps it meanwhile
        index.require_passages()
        q = self.encode(questions)  # (B, D)
        if not torch.isfinite(q).all():
            raise NonFinite("the query encoder gave NaN or infinite vectors; its weights are damaged (a diverged "
                            "training run?): load another checkpoint or retrain")
        if k > len(index):
            log.warning("n_docs=%d is larger than the index (%d passages); using %d", k, len(index), len(index))
            k = len(index)
        hits = index.search(q.detach().float().cpu().numpy(), k, return_vectors=True)  # one batched search
        d = torch.from_numpy(hits.vectors).to(q.device, q.dtype)  # (B, K, D)
        doc_scores = torch.einsum("bkd,bd->bk", d, q)  # (B, K)
        missing = torch.from_numpy(hits.ids < 0).to(q.device)  # (B, K) no hit: masked out of every softmax
        if missing.any():
            doc_scores = doc_scores.masked_fill(missing, float("-inf"))
        passages = [index.passages(row) for row in hits.ids]
        return Retrieved(hits.ids, doc_scores, passages)
