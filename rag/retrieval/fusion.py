"""Hybrid retrieval: the dense and the BM25 candidate lists of each question merged into one ranking.

Pure functions on (Q, n) arrays of row positions (-1: no hit) and scores, tested against a brute-force fusion.
Two fusions: reciprocal-rank fusion (Cormack et al. 2009), score = Σ_side rrf_k / (rrf_k + rank), and a weighted
sum of min-max-normalised scores, (1 - w)·dense + w·bm25, where a side that did not find a passage contributes 0.
Both scores lie in [0, 2] or [0, 1], on the scale of the cosine scores the prior was tuned for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fused:
    ids: np.ndarray  # (Q, k) row positions, best first; -1 where fewer than k candidates
    scores: np.ndarray  # (Q, k) float32 fused scores; -inf where the id is -1
    ranks: np.ndarray  # (Q, k, 2) 1-based rank of each passage on the dense and the BM25 side; 0: not found there


def _side(ids: np.ndarray, scores: np.ndarray, method: str, rrf_k: int) -> list[dict[int, tuple[int, float]]]:
    """Per question: row -> (1-based rank, contribution before weighting)."""
    out = []
    for row_ids, row_scores in zip(ids, scores, strict=True):
        valid = row_ids >= 0
        s = row_scores[valid].astype(np.float64)
        if method == "sum":  # min-max over this side's candidates; a single candidate gets 1
            span = s.max() - s.min() if len(s) else 0.0
            s = (s - s.min()) / span if span > 0 else np.ones_like(s)
        out.append({int(i): (r + 1, rrf_k / (rrf_k + r + 1) if method == "rrf" else float(v))
                    for r, (i, v) in enumerate(zip(row_ids[valid], s, strict=True))})
    return out


def fuse(dense_ids: np.ndarray, dense_scores: np.ndarray, bm25_ids: np.ndarray, bm25_scores: np.ndarray, k: int,
         method: str, bm25_weight: float, rrf_k: int) -> Fused:
    """The top k of the union of both sides' candidates by fused score (ties: dense rank first, then row); the
    settings are FusionConfig's."""
    weights = (1.0, 1.0) if method == "rrf" else (1.0 - bm25_weight, bm25_weight)
    sides = (_side(dense_ids, dense_scores, method, rrf_k), _side(bm25_ids, bm25_scores, method, rrf_k))
    Q = len(dense_ids)
    ids = np.full((Q, k), -1, np.int64)
    scores = np.full((Q, k), -np.inf, np.float32)
    ranks = np.zeros((Q, k, 2), np.int64)
    for q in range(Q):
        rows = set(sides[0][q]) | set(sides[1][q])
        total = {i: sum(w * side[q][i][1] for w, side in zip(weights, sides, strict=True) if i in side[q])
                 for i in rows}
        order = sorted(rows, key=lambda i: (-total[i], sides[0][q].get(i, (10**12,))[0], i))[:k]
        for j, i in enumerate(order):
            ids[q, j], scores[q, j] = i, total[i]
            ranks[q, j] = [side[q].get(i, (0,))[0] for side in sides]
    return Fused(ids, scores, ranks)


def in_dense_units(fused: Fused, dense_scores: np.ndarray, method: str, bm25_weight: float, rrf_k: int,
                   depth: int) -> np.ndarray:
    """Fused scores rescaled, per question, so that a passage only the dense side found keeps its dense score gap to
    the others: the prior softmax(prior_scale · score) then has the sharpness it has over dense scores (min-max
    normalising stretched the gaps, and a prior tuned on cosines put all its mass on the first passage)."""
    valid = np.isfinite(dense_scores)
    span = np.where(valid.any(1), np.where(valid, dense_scores, -np.inf).max(1)
                    - np.where(valid, dense_scores, np.inf).min(1), 0.0)  # (Q,) the dense candidates' score range
    unit = (1.0 - bm25_weight) if method == "sum" else 1.0 - rrf_k / (rrf_k + depth)  # one dense range, fused
    return (fused.scores * (span / max(unit, 1e-6))[:, None]).astype(np.float32)
