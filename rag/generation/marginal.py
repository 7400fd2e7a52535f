"""The marginalisation math of RAG (Lewis et al. 2020, eqs. 1-2), as pure functions on tensors in log space.

Shapes: B questions, K passages, T target tokens, V vocabulary.
- `target_lp` (B, K, T): log p(y_t | x, z, y_<t), the log-probability of the target token under passage z.
- `doc_lp` (B, K): log p(z | x), a log-softmax of the doc scores d(z)ᵀq(x) over the K retrieved passages.
- `mask` (B, T): 1 for real target tokens, 0 for padding.
- `vocab_sum` (B, K, T): Σ_v log p(v | x, z, y_<t), for label smoothing (as transformers' RAG computes it).
"""

from __future__ import annotations

import torch


def doc_logprobs(doc_scores: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(B, K) scores -> (B, K) log p(z|x) = log softmax(scale · scores)."""
    return torch.log_softmax(doc_scores.float() * scale, dim=-1)


def gather_target_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                           vocab_sum: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, T, V) logits, (N, T) target ids -> log-prob of each target (N, T) and Σ_v log-probs (N, T) (None
    unless `vocab_sum`: label smoothing alone needs it, and it costs another pass over the logits).

    Uses log p(v) = logit_v - logsumexp(logits), so no (N, T, V) log-softmax tensor is kept for backward.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (N, T)
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    total = logits.sum(-1) - logits.shape[-1] * lse if vocab_sum else None  # (N, T)
    return picked - lse, total


def sequence_logprob(target_lp: torch.Tensor, doc_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RAG-sequence log p(y|x) = log Σ_z p(z|x) Π_t p(y_t|x,z,y_<t)  (eq. 1) -> (B,)."""
    per_doc = (target_lp * mask[:, None, :]).sum(-1) + doc_lp  # (B, K)
    return torch.logsumexp(per_doc, dim=-1)


def token_marginal(target_lp: torch.Tensor, doc_lp: torch.Tensor) -> torch.Tensor:
    """RAG-token log p(y_t|x,y_<t) = log Σ_z p(z|x) p(y_t|x,z,y_<t)  (eq. 2) -> (B, T)."""
    return torch.logsumexp(target_lp + doc_lp[:, :, None], dim=1)


def rag_sequence_loss(
    target_lp: torch.Tensor,
    doc_lp: torch.Tensor,
    mask: torch.Tensor,
    smoothing: float = 0.0,
    vocab_sum: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """−log p(y|x) per question (B,), optionally label-smoothed.

    Smoothing follows transformers' `RagSequenceForGeneration.get_nll`: the smoothing term marginalises
    Σ_t Σ_v log p(v|x,z,y_<t) over passages like the likelihood, weighted by ε/V.
    """
    mask = mask.to(target_lp.dtype)
    nll = -sequence_logprob(target_lp, doc_lp, mask)
    if not smoothing:
        return nll
    if vocab_sum is None or vocab_size is None:
        raise ValueError("label smoothing needs vocab_sum and vocab_size")
    smooth = -torch.logsumexp((vocab_sum * mask[:, None, :]).sum(-1) + vocab_size * doc_lp, dim=-1)  # (B,)
    return (1.0 - smoothing) * nll + smoothing / vocab_size * smooth


def rag_token_loss(
    target_lp: torch.Tensor,
    doc_lp: torch.Tensor,
    mask: torch.Tensor,
    smoothing: float = 0.0,
    full_lp: torch.Tensor | None = None,
) -> torch.Tensor:
    """−Σ_t log Σ_z p(z|x) p(y_t|x,z,y_<t) per question (B,), optionally label-smoothed.

    Smoothing needs the whole marginal distribution: `full_lp` (B, K, T, V) log-probs; the smoothing term is
    Σ_t Σ_v log Σ_z p(z|x) p(v|x,z,y_<t), weighted by ε/V (as transformers' `RagTokenForGeneration.get_nll`).
    """
    mask = mask.to(target_lp.dtype)
    nll = -(token_marginal(target_lp, doc_lp) * mask).sum(-1)  # (B,)
    if not smoothing:
        return nll
    if full_lp is None:
        raise ValueError("label smoothing in RAG-token needs the full (B, K, T, V) log-probs")
    marginal = torch.logsumexp(full_lp + doc_lp[:, :, None, None], dim=1)  # (B, T, V)
    smooth = -(marginal.sum(-1) * mask).sum(-1)  # (B,)
    return (1.0 - smoothing) * nll + smoothing / full_lp.shape[-1] * smooth


def token_posteriors(target_lp: torch.Tensor, doc_lp: torch.Tensor) -> torch.Tensor:
    """p(z | x, y_t, y_<t) ∝ p(z|x) p(y_t|x,z,y_<t): which passage produced each token -> (B, K, T)."""
    return torch.softmax(target_lp + doc_lp[:, :, None], dim=1)


def sequence_posteriors(target_lp: torch.Tensor, doc_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """p(z | x, y) ∝ p(z|x) p(y|x,z) for a whole answer -> (B, K)."""
    return torch.softmax((target_lp * mask[:, None, :].to(target_lp.dtype)).sum(-1) + doc_lp, dim=-1)


def distant_supervision_loss(doc_scores: torch.Tensor, positive: torch.Tensor, scale: float) -> torch.Tensor:
    """-log Σ_{z positive} softmax(scale · d(z)ᵀq(x)) over the retrieved passages, per question (B,).

    `positive` (B, M) marks the passages that hold a gold answer; a question with none contributes 0. `scale`
    sharpens cosine scores, whose softmax over [-1, 1] is nearly flat and would barely move BERT_q.
    """
    lp = torch.log_softmax(scale * doc_scores.float(), dim=-1)
    has = positive.any(-1)
    # rows without a positive take every passage (a finite, unused value) so no NaN gradient flows from -inf
    pos = lp.masked_fill(~(positive | ~has[:, None]), float("-inf")).logsumexp(-1)
    return -pos * has
