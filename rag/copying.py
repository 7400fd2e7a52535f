"""Extractive decoding (`decoding.copy`): restrict every decoding row to continuations of a span of its passages.

A row's state is the set of positions in its passages' token sequences where the tokens generated so far end; the
next token may be any token found right after one of them (at the start: any passage token), or, once something
was generated, an end token. Everything else gets log-probability -inf before the search picks.
"""

from __future__ import annotations

import torch


class CopyStepper:
    """Wraps a RAG-token or per-row stepper; `spans[r]` are the token sequences row r may copy from."""

    def __init__(self, stepper, spans: list[list[list[int]]], eos: list[int]):
        self.stepper, self.eos = stepper, eos
        self.spans = spans  # per decoding row
        self.live = [None] * len(spans)  # per row: positions (passage, index) where the copy so far ends

    def _mask(self, lp: torch.Tensor) -> torch.Tensor:
        allowed = torch.zeros_like(lp, dtype=torch.bool)
        for r, seqs in enumerate(self.spans):
            if not any(seqs):  # no passage (closed-book): nothing to copy from, no constraint
                allowed[r] = True
                continue
            nxt = set()
            if self.live[r] is None:  # nothing generated yet: a span may start anywhere, but not with an end
                for seq in seqs:
                    nxt.update(seq)
                nxt.difference_update(self.eos)
            else:
                nxt.update(seqs[s][i] for s, i in self.live[r] if i < len(seqs[s]))
                nxt.update(self.eos)
            if nxt:
                allowed[r, list(nxt)] = True
            else:
                allowed[r, self.eos] = True
        return lp.masked_fill(~allowed, float("-inf"))

    def _advance(self, tokens: torch.Tensor) -> None:
        for r, x in enumerate(tokens.tolist()):
            seqs = self.spans[r]
            if self.live[r] is None:
                self.live[r] = [(s, i + 1) for s, seq in enumerate(seqs) for i, t in enumerate(seq) if t == x]
            else:
                self.live[r] = [(s, i + 1) for s, i in self.live[r] if i < len(seqs[s]) and seqs[s][i] == x]

    def start(self) -> torch.Tensor:
        return self._mask(self.stepper.start())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._advance(tokens)
        return self._mask(self.stepper.step(tokens))

    def reorder(self, index: torch.Tensor) -> None:
        idx = index.tolist()
        self.live = [self.live[i] for i in idx]
        self.spans = [self.spans[i] for i in idx]
        self.stepper.reorder(index)

