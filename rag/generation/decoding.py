"""Decoding: greedy and beam search over a next-token distribution, RAG-token and RAG-sequence on top.

The search follows transformers' beam search step for step (top 2·beams continuations, finished hypotheses
scored by sum log-prob / length ** length_penalty, the same early-stop heuristic), so that it returns the same
tokens as `RagTokenForGeneration.generate` / `RagSequenceForGeneration.generate` on the same weights.
Shapes: B questions, K passages, W beams, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rag.config import DecodingConfig
from rag.generation.generator import Contexts, Generator
from rag.generation.marginal import sequence_logprob, token_marginal

NEG = -1.0e9
# (hypothesis, passage) rows teacher-forced at once when RAG-sequence rescores its hypotheses: each row gathers its
# passage's prompt cache and yields (T, V) logits, so k=10 passages x 4 beams (400 rows) at once peaked at 6.6 GiB
# with a 135M generator; in passes of 64 rows the rescoring stays within a few hundred MiB.
RESCORE_ROWS = 64


@dataclass(frozen=True)
class Hypothesis:
    tokens: tuple[int, ...]  # generated tokens, EOS included when it was produced
    score: float  # sum of log-probs / length ** length_penalty (the beam's ranking score)
    logprob: float  # sum of log-probs


class TokenStepper:
    """RAG-token: next-token log-probs log Σ_z p(z|x) p(y_t|x,z,y_<t) for B·W rows, each over its K passages.

    Decoding rows are ordered (b, w, k); every (b, k) encoder output is computed once and shared by all W beams.
    """

    def __init__(self, gen: Generator, ctx: Contexts, doc_lp: torch.Tensor, beams: int):
        self.gen, self.ctx, self.beams = gen, ctx, beams
        B, K = doc_lp.shape
        self.K = K
        self.doc_lp = doc_lp.repeat_interleave(beams, 0)  # (B·W, K)
        self.rows = (torch.arange(B, device=doc_lp.device)[:, None, None] * K
                     + torch.arange(K, device=doc_lp.device)[None, None, :]).expand(B, beams, K).reshape(-1)

    def _marginal(self, logits: torch.Tensor) -> torch.Tensor:
        lp = torch.log_softmax(logits.float(), -1).view(-1, self.K, logits.shape[-1])  # (B·W, K, V)
        return token_marginal(lp, self.doc_lp)  # (B·W, V): eq. 2 with the vocabulary in place of the target steps

    def start(self) -> torch.Tensor:
        self.state, logits = self.gen.begin(self.ctx, self.rows)
        return self._marginal(logits)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._marginal(self.gen.advance(self.state, tokens.repeat_interleave(self.K)))

    def reorder(self, index: torch.Tensor) -> None:
        # beam index (B·W,) -> row index (B·W·K,): beam w takes over beam index[w]'s K passage caches
        rows = (index[:, None] * self.K + torch.arange(self.K, device=index.device)[None, :]).reshape(-1)
        self.gen.reorder(self.state, rows)

    def keep(self, index: torch.Tensor) -> None:
        """Go on with the questions `index` only (the others have finished)."""
        self.doc_lp = self.doc_lp[index]
        self.reorder(index)


class RowStepper:
    """Plain decoding of each context row on its own (RAG-sequence's beam per passage): B·K "questions"."""

    def __init__(self, gen: Generator, ctx: Contexts, rows: torch.Tensor, beams: int):
        self.gen, self.ctx = gen, ctx
        self.rows = rows.repeat_interleave(beams)

    def start(self) -> torch.Tensor:
        self.state, logits = self.gen.begin(self.ctx, self.rows)
        return torch.log_softmax(logits.float(), -1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.gen.advance(self.state, tokens).float(), -1)

    def reorder(self, index: torch.Tensor) -> None:
        self.gen.reorder(self.state, index)

    keep = reorder


def _constrain_logprobs(lp: torch.Tensor, generated: int, cfg: DecodingConfig, eos: list[int],
                       forced_bos: int | None):
    """Logits processors: forced first token, minimum length (EOS barred until min_new_tokens)."""
    if generated == 0 and forced_bos is not None:
        keep = lp[:, forced_bos].clone()
        lp = torch.full_like(lp, float("-inf"))
        lp[:, forced_bos] = keep if cfg.num_beams > 1 else 0.0
    if generated < cfg.min_new_tokens:
        lp = lp.clone()
        lp[:, eos] = float("-inf")
    return lp


def greedy(stepper, batch: int, cfg: DecodingConfig, eos: list[int], pad: int,
           forced_bos: int | None = None) -> list[list[Hypothesis]]:
    lp = stepper.start()
    dev = lp.device
    eos_t = torch.tensor(eos, device=dev)
    tokens = torch.full((batch, cfg.max_new_tokens), pad, dtype=torch.long, device=dev)
    total = torch.zeros(batch, device=dev)
    alive = torch.arange(batch, device=dev)  # the questions still decoding; finished ones leave the batch
    for t in range(cfg.max_new_tokens):
        lp = _constrain_logprobs(lp, t, cfg, eos, forced_bos)
        best = lp.argmax(-1)  # (A,)
        total[alive] += lp.gather(1, best[:, None]).squeeze(1)
        tokens[alive, t] = best
        going = ~torch.isin(best, eos_t)
        if not going.any() or t + 1 == cfg.max_new_tokens:
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            stepper.keep(keep)
            alive, best = alive[keep], best[keep]
        lp = stepper.step(best)
    seqs = tokens[:, : t + 1].tolist()  # (B, L)
    out = []
    for b, seq in enumerate(seqs):
        seq = _up_to_eos(seq, eos)
        out.append([Hypothesis(seq, float(total[b]) / len(seq) ** cfg.length_penalty, float(total[b]))])
    return out


def _up_to_eos(seq: list[int], eos: list[int]) -> tuple[int, ...]:
    """A decoded row cut after its first end-of-sequence token."""
    n = next((i + 1 for i, x in enumerate(seq) if x in eos), len(seq))
    return tuple(seq[:n])


def beam_search(stepper, batch: int, cfg: DecodingConfig, eos: list[int], pad: int,
                forced_bos: int | None = None) -> list[list[Hypothesis]]:
    """Beam search over B·W rows ordered (b, w), returning each question's finished hypotheses, best first."""
    W, L = cfg.num_beams, cfg.max_new_tokens
    lp = stepper.start()
    dev = lp.device
    V = lp.shape[-1]
    keep = max(2, 1 + len(eos)) * W
    top_w = torch.arange(keep, device=dev) < W  # only the top W continuations may finish
    eos_t = torch.tensor(eos, device=dev)
    running = torch.full((batch, W, L), pad, dtype=torch.long, device=dev)
    running_scores = torch.zeros(batch, W, device=dev)
    running_scores[:, 1:] = NEG  # all beams start identical: expand only the first
    finished = running.clone()
    finished_scores = torch.full((batch, W), NEG, device=dev)
    finished_raw = torch.full((batch, W), NEG, device=dev)
    is_finished = torch.zeros(batch, W, dtype=torch.bool, device=dev)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=dev)
    batch_offset = torch.arange(batch, device=dev)[:, None] * W
    for t in range(L):
        lp = _constrain_logprobs(lp, t, cfg, eos, forced_bos)
        acc = (lp.view(batch, W, V) + running_scores[:, :, None]).view(batch, W * V)
        top_lp, top_idx = acc.topk(keep, dim=1)  # (B, 2W)
        src = top_idx // V
        tok = top_idx % V
        cand = running.gather(1, src[:, :, None].expand(-1, -1, L)).clone()  # (B, 2W, L)
        cand[:, :, t] = tok
        hits = torch.isin(tok, eos_t) | (t + 1 >= L)  # (B, 2W)
        # next running beams: the best W continuations that did not stop
        run_lp = top_lp + hits.float() * NEG
        nxt = run_lp.topk(W, dim=1).indices  # (B, W)
        running = cand.gather(1, nxt[:, :, None].expand(-1, -1, L))
        running_scores = run_lp.gather(1, nxt)
        beam_src = src.gather(1, nxt)  # (B, W) which old beam each new beam continues
        # finished hypotheses: stopped among the top W, scored with the length penalty
        done = hits & top_w[None, :]
        length = t + 1
        scored = top_lp / length**cfg.length_penalty
        full = is_finished.all(1, keepdim=True) & cfg.early_stopping
        scored = scored + (full | ~can_improve).float() * NEG + (~done).float() * NEG
        merged = torch.cat([finished_scores, scored], 1)
        best = merged.topk(W, dim=1).indices
        finished = torch.cat([finished, cand], 1).gather(1, best[:, :, None].expand(-1, -1, L))
        finished_scores = merged.gather(1, best)
        finished_raw = torch.cat([finished_raw, top_lp], 1).gather(1, best)
        is_finished = torch.cat([is_finished, done], 1).gather(1, best)
        # the early-stop heuristic of transformers (early_stopping=False): the best running beam at its
        # current length cannot beat the worst finished one
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, NEG)
        best_running = running_scores[:, :1] / (t + 1) ** cfg.length_penalty
        can_improve = can_improve & (best_running > worst).any(1, keepdim=True)
        if not can_improve.any() or (cfg.early_stopping and is_finished.all()) or hits.all() or t + 1 == L:
            break
        stepper.reorder((beam_src + batch_offset).reshape(-1))
        lp = stepper.step(running[:, :, t].reshape(-1))
    return _finished(finished, finished_scores, finished_raw, eos)


def _finished(seqs: torch.Tensor, scores: torch.Tensor, raw: torch.Tensor, eos: list[int]) -> list[list[Hypothesis]]:
    """(B, W, L) finished beams with their scores -> each question's hypotheses, best first (empty slots left out)."""
    return [[Hypothesis(_up_to_eos(seqs[b, w].tolist(), eos), float(scores[b, w]), float(raw[b, w]))
             for w in range(seqs.shape[1]) if scores[b, w] > NEG / 2] for b in range(seqs.shape[0])]


def search(stepper, batch: int, cfg: DecodingConfig, gen: Generator) -> list[list[Hypothesis]]:
    run = greedy if cfg.num_beams == 1 else beam_search
    with torch.inference_mode():
        return run(stepper, batch, cfg, gen.eos_ids, gen.pad_id, gen.forced_bos)


def rag_token(gen: Generator, ctx: Contexts, doc_lp: torch.Tensor, cfg: DecodingConfig) -> list[list[Hypothesis]]:
    """RAG-token decoding: a search over the marginal next-token distribution (eq. 2)."""
    B, K = doc_lp.shape
    hyps = search(TokenStepper(gen, ctx, doc_lp, cfg.num_beams), B, cfg, gen)
    return [h[: cfg.num_return_sequences] for h in hyps]


def answer_logprobs(gen: Generator, ctx: Contexts, K: int, questions: list[int], targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x, z, y_<t) of each answer (C, T), padded at the end, under all K passages of its question
    `questions[c]` -> (C, K, T): teacher-forced decoder passes over the C·K (answer, passage) pairs, `RESCORE_ROWS`
    rows at a time, reusing the encoder outputs (prompt caches). Padding at the end changes no earlier position."""
    per_pass = max(1, RESCORE_ROWS // K)  # answers per pass
    passages = torch.arange(K, device=targets.device)
    parts = []
    with torch.inference_mode():
        for s in range(0, len(targets), per_pass):
            part = targets[s : s + per_pass]  # (c, T)
            rows = (torch.tensor(questions[s : s + per_pass], device=targets.device)[:, None] * K
                    + passages[None, :]).reshape(-1)  # (c·K,)
            lp, _, _ = gen.target_logprobs(ctx, rows, part.repeat_interleave(K, 0))  # (c·K, T)
            parts.append(lp.view(len(part), K, -1))  # (c, K, T)
    return torch.cat(parts)


def score_hypotheses(gen: Generator, ctx: Contexts, doc_lp: torch.Tensor, b: int,
                     hyps: list[tuple[int, ...]], forced_bos: int | None) -> torch.Tensor:
    """log p(y|x) = log Σ_z p(z|x) p(y|x,z) for each hypothesis under all K passages of question b -> (C,)."""
    K = doc_lp.shape[1]
    targets, mask = gen.pad(hyps)  # (C, T), (C, T)
    if forced_bos is not None and all(h and h[0] == forced_bos for h in hyps):
        mask[:, 0] = 0  # a forced first token carries no evidence (transformers' exclude_bos_score)
    lp = answer_logprobs(gen, ctx, K, [b] * len(hyps), targets)  # (C, K, T)
    return sequence_logprob(lp, doc_lp[b][None, :].expand(len(hyps), K), mask)  # (C,) eq. 1


def rag_sequence(gen: Generator, ctx: Contexts, doc_lp: torch.Tensor, cfg: DecodingConfig) -> list[list[Hypothesis]]:
    """RAG-sequence decoding (eq. 1): a beam per passage, then the union of hypotheses marginalised over passages,
    "thorough" (every hypothesis scored under every passage) or "fast" (p(y|x,z) = 0 outside z's beam)."""
    B, K = doc_lp.shape
    rows = torch.arange(B * K, device=doc_lp.device)
    per_row = search(RowStepper(gen, ctx, rows, cfg.num_beams), B * K, cfg, gen)
    out = []
    for b in range(B):
        beams = per_row[b * K : (b + 1) * K]
        cands = list(dict.fromkeys(h.tokens for hs in beams for h in hs))  # dedupe, first seen first
        if cfg.sequence_decoding == "thorough":
            scores = score_hypotheses(gen, ctx, doc_lp, b, cands, gen.forced_bos)
        else:
            scores = torch.full((len(cands),), float("-inf"))
            index = {c: i for i, c in enumerate(cands)}
            for k, hs in enumerate(beams):
                for h in hs:
                    i = index[h.tokens]
                    scores[i] = torch.logaddexp(scores[i], torch.tensor(h.logprob) + doc_lp[b, k].cpu())
        top = scores.topk(min(cfg.num_return_sequences, len(cands))).indices.tolist()
        out.append([Hypothesis(cands[i], float(scores[i]), float(scores[i])) for i in top])
    return out
