"""The RAG model: retriever + generator, the marginal likelihood loss, and decoding in both modes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rag.config import DecodingConfig, EncoderConfig, RagConfig
from rag.generation import decoding, marginal
from rag.generation.generator import Contexts, Generator, load_generator
from rag.metrics import passage_has_answer
from rag.retrieval.retriever import Retrieved, Retriever


@dataclass(frozen=True)
class Generated:
    """One question's decoding result with what explains it."""

    tokens: tuple[int, ...]
    text: str
    score: float  # log p(y|x) (RAG-sequence) or Σ_t log p(y_t|x,y_<t) (RAG-token); beam-ranking score
    doc_scores: tuple[float, ...]  # (K,) d(z)ᵀq(x)
    prior: tuple[float, ...]  # (K,) p(z|x)
    posterior: tuple[float, ...]  # (K,) p(z|x,y)
    token_posteriors: tuple[tuple[float, ...], ...]  # (T, K) p(z|x,y_<=t): which passage produced each token


@dataclass(frozen=True)
class LossSettings:
    """What a training step's loss is made of (rag.train builds it from the TrainConfig and the RagConfig)."""

    mode: str = "sequence"
    n_docs: int = 5
    smoothing: float = 0.0
    rag_weight: float = 1.0
    distant_weight: float = 0.0
    distant_docs: int = 50
    distant_scale: float = 20.0
    unanswerable_weight: float = 1.0


class RagModel(nn.Module):
    def __init__(self, retriever: Retriever, generator: Generator, prior_scale: float = 1.0):
        super().__init__()
        self.retriever = retriever
        self.generator = generator
        self.prior_scale = prior_scale  # p(z|x) = softmax(prior_scale · d(z)ᵀq(x))

    @classmethod
    def load(cls, cfg: RagConfig, precision: str) -> tuple[RagModel, EncoderConfig]:
        """The retriever (the index and BERT_q, checked against each other before the generator loads), then the
        generator, on `cfg.device` with the weights in the dtype of `precision`. Returns the model and the query
        encoder's config."""
        retriever, qcfg = Retriever.load(cfg, precision)
        generator = load_generator(cfg.generator).place(cfg.device, precision)
        return cls(retriever, generator, cfg.prior_scale), qcfg

    def doc_logprobs(self, doc_scores: torch.Tensor) -> torch.Tensor:
        return marginal.doc_logprobs(doc_scores, self.prior_scale)

    def contexts(self, questions: list[str], retrieved: Retrieved) -> Contexts:
        """The reader's inputs: each question (or what query_translation gives the reader instead) with its
        passages; one place, so that training, scoring and decoding read the same text."""
        return self.generator.prepare(retrieved.read or questions, retrieved.passages)

    def target_logprobs(self, ctx: Contexts, targets: torch.Tensor, K: int, smoothing: bool = False,
                        full: bool = False):
        """(B, T) targets under each of the K context rows per question -> (B, K, T) log-probs (+ vocab sums
        for label smoothing, + the full (B, K, T, V) log-probs for RAG-token smoothing)."""
        B, T = targets.shape
        rows = torch.arange(B * K, device=targets.device)
        lp, vocab_sum, full_lp = self.generator.target_logprobs(ctx, rows, targets.repeat_interleave(K, 0),
                                                                smoothing, full)  # (B·K, T), (B·K, T), (B·K, T, V)
        return (lp.view(B, K, T), None if vocab_sum is None else vocab_sum.view(B, K, T),
                None if full_lp is None else full_lp.view(B, K, T, -1))

    def forward(self, questions: list[str], answers: list[str], settings: LossSettings = LossSettings()) \
            -> torch.Tensor:
        """rag_weight · the RAG loss + distant_weight · the distant-supervision loss of BERT_q, per question (B,).

        Distant supervision (as DPR and ORQA train retrievers without gold passages): among the top
        `distant_docs` passages, those holding the answer string are positives. With rag_weight 0 the generator
        is not run at all. The RAG loss of a question none of whose `n_docs` passages holds its answer is
        weighted by `unanswerable_weight`."""
        mode, n_docs, smoothing = settings.mode, settings.n_docs, settings.smoothing
        rag_weight, distant_weight = settings.rag_weight, settings.distant_weight
        distant_docs, unanswerable_weight = settings.distant_docs, settings.unanswerable_weight
        k = max(n_docs, distant_docs if distant_weight else 0)
        retrieved = self.retriever(questions, k)
        device = retrieved.doc_scores.device
        total = torch.zeros(len(questions), device=device)
        needs_positives = distant_weight or (rag_weight and unanswerable_weight != 1.0)
        positive = torch.tensor([[p is not None and passage_has_answer(p, [a]) for p in ps]
                                 for ps, a in zip(retrieved.passages, answers, strict=True)],
                                device=device) if needs_positives else None
        if distant_weight:
            scores = retrieved.doc_scores if retrieved.dense_scores is None else retrieved.dense_scores
            total = total + distant_weight * marginal.distant_supervision_loss(scores, positive, settings.distant_scale)
        if rag_weight:
            weight = torch.ones(len(questions), device=device)
            if unanswerable_weight != 1.0:
                weight = torch.where(positive[:, :n_docs].any(1), weight, weight * unanswerable_weight)
            rows = weight.nonzero().flatten().tolist()  # a question of weight 0 never reaches the generator
            if rows:
                top = Retrieved(retrieved.ids[rows, :n_docs], retrieved.doc_scores[rows, :n_docs],
                                [retrieved.passages[b][:n_docs] for b in rows],
                                read=None if retrieved.read is None else [retrieved.read[b] for b in rows])
                loss = self.loss([questions[b] for b in rows], [answers[b] for b in rows], mode, n_docs,
                                 smoothing, top)
                total = total.index_add(0, torch.tensor(rows, device=device), rag_weight * weight[rows] * loss)
        return total

    def loss(self, questions: list[str], answers: list[str], mode: str = "sequence", n_docs: int = 5,
             smoothing: float = 0.0, retrieved: Retrieved | None = None) -> torch.Tensor:
        """Negative marginal log-likelihood per question (B,); gradient reaches BERT_q through the doc scores."""
        retrieved = retrieved or self.retriever(questions, n_docs)
        K = retrieved.doc_scores.shape[1]
        targets, mask = self.generator.target_ids(answers)  # (B, T), (B, T)
        ctx = self.contexts(questions, retrieved)
        # a frozen generator's log-probs are constants of the loss: no graph is kept for them
        trains_generator = any(p.requires_grad for p in self.generator.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains_generator):
            lp, vocab_sum, full = self.target_logprobs(ctx, targets, K, smoothing > 0,
                                                       full=mode == "token" and smoothing > 0)
        doc_lp = self.doc_logprobs(retrieved.doc_scores)
        if mode == "sequence":
            return marginal.rag_sequence_loss(lp, doc_lp, mask, smoothing, vocab_sum, self.generator.vocab_size)
        return marginal.rag_token_loss(lp, doc_lp, mask, smoothing, full)

    @torch.inference_mode()
    def generate(self, questions: list[str], mode: str, cfg: DecodingConfig, n_docs: int,
                 retrieved: Retrieved | None = None) -> tuple[Retrieved, list[list[Generated]]]:
        retrieved = retrieved or self.retriever(questions, n_docs)
        ctx = self.contexts(questions, retrieved)
        doc_lp = self.doc_logprobs(retrieved.doc_scores)
        run = decoding.rag_token if mode == "token" else decoding.rag_sequence
        hyps = run(self.generator, ctx, doc_lp, cfg)
        pairs = [(b, h) for b, hs in enumerate(hyps) for h in hs]
        flat = iter(self._explain(ctx, doc_lp, retrieved, pairs))
        return retrieved, [[next(flat) for _ in hs] for hs in hyps]

    def _explain(self, ctx: Contexts, doc_lp: torch.Tensor, retrieved: Retrieved,
                 pairs: list[tuple[int, decoding.Hypothesis]]) -> list[Generated]:
        """Posteriors of each (question, answer), from one set of teacher-forced passes over all the answers (a
        whole served batch at once, not one pass per answer)."""
        K = doc_lp.shape[1]
        tokens = [list(h.tokens) or [self.generator.eos_id] for _, h in pairs]
        targets, _ = self.generator.pad(tokens)
        lp = decoding.answer_logprobs(self.generator, ctx, K, [b for b, _ in pairs], targets)  # (C, K, T)
        out = []
        for i, (b, hyp) in enumerate(pairs):
            one = lp[i : i + 1, :, : len(tokens[i])]  # (1, K, T_i)
            mask = torch.ones(1, len(tokens[i]), device=doc_lp.device)
            post = marginal.sequence_posteriors(one, doc_lp[b : b + 1], mask)[0]
            tok_post = marginal.token_posteriors(one, doc_lp[b : b + 1])[0].T  # (T, K)
            out.append(Generated(
                tokens=tuple(hyp.tokens), text=self.generator.decode(list(hyp.tokens)), score=hyp.score,
                doc_scores=tuple(retrieved.doc_scores[b].tolist()), prior=tuple(doc_lp[b].exp().tolist()),
                posterior=tuple(post.tolist()), token_posteriors=tuple(tuple(r) for r in tok_post.tolist()),
            ))
        return out
