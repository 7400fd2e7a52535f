"""Extractive decoding (`decoding.copy`): restrict every decoding row to continuations of a span of its passages.

A row's state is the set of positions in its passages' token sequences where the tokens generated so far end.
- The first token may be any passage token that begins a word (or is white space before one) and is not one of the
  question's own words: an answer seldom starts by repeating the question, nor with a quote or a comma.
- The next token may be any token found right after one of the positions.
- The answer may end (EOS or a stop string) once it holds a letter or digit and one of the positions sits at a word
  boundary in its passage: "1" of "1969" cannot be an answer, "1969" can.
Everything else gets log-probability -inf before the search picks.
"""

from __future__ import annotations

import torch


class CopyStepper:
    """Wraps a RAG-token or per-row stepper; `spans[r]` are the token sequences row r may copy from, `banned[r]`
    the tokens its answer may not start with, `text(t)` a token's text."""

    def __init__(self, stepper, spans: list[list[list[int]]], eos: list[int], text,
                 banned: list[set[int]] | None = None):
        self.stepper, self.eos, self.text = stepper, eos, text
        self.spans = spans  # per decoding row
        self.banned = banned or [set() for _ in spans]
        self.live = [None] * len(spans)  # per row: positions (passage, index) where the copy so far ends
        self.has_word = [False] * len(spans)

    def _starts_word(self, t: int) -> bool:
        s = self.text(t).strip()
        return not s or s[0].isalnum()

    def _boundary(self, seq: list[int], i: int) -> bool:
        return i >= len(seq) or not self.text(seq[i])[:1].isalnum()

    def _mask(self, lp: torch.Tensor) -> torch.Tensor:
        allowed = torch.zeros_like(lp, dtype=torch.bool)
        for r, seqs in enumerate(self.spans):
            if not any(seqs):  # no passage (closed-book): nothing to copy from, no constraint
                allowed[r] = True
                continue
            live = self.live[r]
            if live is None:
                nxt = {t for seq in seqs for t in seq if t not in self.banned[r] and self._starts_word(t)}
                nxt.difference_update(self.eos)
            else:
                nxt = {seqs[s][i] for s, i in live if i < len(seqs[s])}
                if not nxt or (self.has_word[r] and any(self._boundary(seqs[s], i) for s, i in live)):
                    nxt.update(self.eos)
            allowed[r, list(nxt)] = True
        return lp.masked_fill(~allowed, float("-inf"))

    def _advance(self, tokens: torch.Tensor) -> None:
        for r, x in enumerate(tokens.tolist()):
            seqs = self.spans[r]
            if self.live[r] is None:
                self.live[r] = [(s, i + 1) for s, seq in enumerate(seqs) for i, t in enumerate(seq) if t == x]
            else:
                self.live[r] = [(s, i + 1) for s, i in self.live[r] if i < len(seqs[s]) and seqs[s][i] == x]
            self.has_word[r] = self.has_word[r] or any(c.isalnum() for c in self.text(x))

    def start(self) -> torch.Tensor:
        return self._mask(self.stepper.start())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._advance(tokens)
        return self._mask(self.stepper.step(tokens))

    def reorder(self, index: torch.Tensor) -> None:
        idx = index.tolist()
        self.live = [self.live[i] for i in idx]
        self.spans = [self.spans[i] for i in idx]
        self.banned = [self.banned[i] for i in idx]
        self.has_word = [self.has_word[i] for i in idx]
        self.stepper.reorder(index)


def question_words(gen, question: str, spans: list[list[int]]) -> set[int]:
    """The tokens of `spans` whose text is a word of the question (case and space ignored)."""
    words = {w.lower() for w in question.split()} | {w.strip("?.,!\"'").lower() for w in question.split()}
    return {t for t in {t for seq in spans for t in seq} if gen.token_text(t).strip().lower() in words}
