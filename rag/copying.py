"""Extractive decoding (`decoding.copy`): restrict every decoding row to continuations of a span of its passages.

A row's state is the set of positions in its passages' token sequences where the tokens generated so far end.
- The answer starts at a word of a passage (`answer_starts`): not one of the question's own words (an answer
  seldom repeats the question), not a function word ("the", "in"), not a quote or a comma, and of the type the
  question asks for when its wh-word says so ("when" a year or a date, "how many" a number, "who"/"where" a name),
  unless no passage has a word of that type.
- The next token may be any token found right after one of the positions.
- The answer may end (EOS or a stop string) once it holds a letter or digit and one of the positions sits at a word
  boundary in its passage, i.e. nothing but punctuation follows it up to the next white space: "1" of "1969" and
  "121" of "121,684" cannot be answers, "1969" of "1969)." can. At a boundary after `max_words` words
  (0: no limit) it must end: NQ-style answers are at most five words.
Everything else gets log-probability -inf before the search picks.
"""

from __future__ import annotations

import dataclasses
import re

import torch

MONTHS = {"january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"}
NUMBER_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million",
                "billion", "dozen", "half", "once", "twice", "zero"}
# Function words an answer does not start with ("The", "In", "A" alone are no answers; exact match drops articles).
FUNCTION_WORDS = {"a", "an", "the", "in", "on", "at", "of", "for", "to", "from", "by", "with", "and", "or", "but",
                  "as", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those",
                  "he", "she", "they", "his", "her", "their", "there", "which", "who", "whom", "whose", "what",
                  "when", "where", "also", "after", "before", "during", "since", "until", "while", "if", "than",
                  "then", "into", "not", "has", "have", "had", "can", "may", "will", "would", "such", "some"}
# The wh-phrase that fixes an answer's type; the earliest in the question wins ("who ... when" asks who).
_TYPES = [
    ("number", r"how (many|much|long|old|far|tall|big|high|deep|fast|often|large|heavy)|what (percent|percentage|"
               r"number|age)|how many times"),
    ("date", r"when|when's|what (year|date|day|month|century|decade|time period)|which (year|century|decade)"),
    ("name", r"who|whom|whose|who's|where|where's"),
]
_TYPE_RE = [(kind, re.compile(rf"\b(?:{pattern})\b")) for kind, pattern in _TYPES]
_OPENERS = "([{\"'“‘"
_STRIP = "\"'“”‘’()[]{},.;:!?"


def answer_type(question: str) -> str | None:
    """"number", "date", "name" or None (any span) from the question's earliest typed wh-phrase."""
    q = question.lower()
    hits = [(m.start(), kind) for kind, rx in _TYPE_RE for m in [rx.search(q)] if m]
    return min(hits)[1] if hits else None


def _fits(word: str, kind: str | None) -> bool:
    if kind is None:
        return True
    if kind == "name":
        return word[0].isupper()
    lower = word.lower()
    if word[0].isdigit() or word[0] in "$£€":
        return True
    return lower in NUMBER_WORDS if kind == "number" else lower in MONTHS


def word_starts(seq: list[int], text) -> list[tuple[int, str]]:
    """(position, word) for each token of `seq` that begins a word: the word is its text up to the next token that
    begins with white space, stripped of punctuation; only words that begin with a letter, digit or currency sign."""
    texts = [text(t) for t in seq]
    out = []
    for i, t in enumerate(texts):
        if i and not (t[:1].isspace() or texts[i - 1][-1:].isspace() or texts[i - 1][-1:] in _OPENERS):
            continue
        j = i + 1
        while j < len(texts) and not texts[j][:1].isspace():
            j += 1
        raw = "".join(texts[i:j]).strip()
        word = raw.strip(_STRIP)
        if word and (raw[0].isalnum() or raw[0] in "$£€"):
            out.append((i, word))
    return out


def _bare(word: str) -> str:
    """A word as the question check compares it: lower case, no surrounding punctuation, no possessive."""
    return _bare_case(word).lower()


def _bare_case(word: str) -> str:
    """A word without surrounding punctuation or possessive, its case kept (names are told by it)."""
    return word.strip(_STRIP).removesuffix("'s").removesuffix("’s")


def _not_answers(question: str) -> set[str]:
    """The words an answer does not start with: the question's own and the function words."""
    return {_bare(w) for w in question.split()} | FUNCTION_WORDS


def answer_starts(question: str, seqs: list[list[int]], text) -> list[tuple[int, int]]:
    """The (passage, position) pairs where an answer to `question` may start (see the module's rules)."""
    asked = _not_answers(question)
    words = [(s, i, w) for s, seq in enumerate(seqs) for i, w in word_starts(seq, text) if _bare(w) not in asked]
    kind = answer_type(question)
    typed = [(s, i) for s, i, w in words if _fits(w, kind)]
    return typed or [(s, i) for s, i, _ in words]


class CopyStepper:
    """Wraps a RAG-token or per-row stepper; `spans[r]` are the token sequences row r may copy from, `questions[r]`
    the question it answers (None: any word may start the answer), `text(t)` a token's text."""

    def __init__(self, stepper, spans: list[list[list[int]]], eos: list[int], text,
                 questions: list[str | None] | None = None, max_words: int = 0):
        self.stepper, self.eos, self.text, self.max_words = stepper, eos, text, max_words
        self.spans = spans  # per decoding row
        memo = {}  # beams repeat a row's spans and question: work them out once
        self.starts = []
        for seqs, q in zip(spans, questions or [None] * len(spans), strict=True):
            if (id(seqs), q) not in memo:
                memo[id(seqs), q] = (answer_starts(q, seqs, text) if q is not None else
                                     [(s, i) for s, seq in enumerate(seqs) for i, _ in word_starts(seq, text)])
            self.starts.append(memo[id(seqs), q])
        self.live = [None] * len(spans)  # per row: positions (passage, index) where the copy so far ends
        self.has_word = [False] * len(spans)
        self.words = [0] * len(spans)  # per row: words begun so far

    def _boundary(self, seq: list[int], i: int) -> bool:
        """Whether a copy ending before position i ends a word: what follows up to the next white space holds no
        letter or digit ("1969" before ")." ends one; "121" before ",684" and "6" before "84" do not)."""
        for t in seq[i:]:
            text = self.text(t)
            if text[:1].isspace():
                return True
            if any(c.isalnum() for c in text):
                return False
        return True

    def _mask(self, lp: torch.Tensor) -> torch.Tensor:
        allowed = torch.zeros_like(lp, dtype=torch.bool)
        for r, seqs in enumerate(self.spans):
            if not any(seqs):  # no passage (closed-book): nothing to copy from, no constraint
                allowed[r] = True
                continue
            live = self.live[r]
            if live is None:
                nxt = {seqs[s][i] for s, i in self.starts[r]}
                nxt.difference_update(self.eos)
            else:
                nxt = {seqs[s][i] for s, i in live if i < len(seqs[s])}
                if not nxt or (self.has_word[r] and any(self._boundary(seqs[s], i) for s, i in live)):
                    if self.max_words and self.words[r] >= self.max_words:
                        nxt.clear()
                    nxt.update(self.eos)
            allowed[r, list(nxt)] = True
        return lp.masked_fill(~allowed, float("-inf"))

    def _advance(self, tokens: torch.Tensor) -> None:
        for r, x in enumerate(tokens.tolist()):
            seqs = self.spans[r]
            live = self.starts[r] if self.live[r] is None else self.live[r]
            self.live[r] = [(s, i + 1) for s, i in live if i < len(seqs[s]) and seqs[s][i] == x]
            self.has_word[r] = self.has_word[r] or any(c.isalnum() for c in self.text(x))
            self.words[r] += live is self.starts[r] or self.text(x)[:1].isspace()

    def start(self) -> torch.Tensor:
        return self._mask(self.stepper.start())

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._advance(tokens)
        return self._mask(self.stepper.step(tokens))

    def reorder(self, index: torch.Tensor) -> None:
        idx = index.tolist()
        self.live = [self.live[i] for i in idx]
        self.spans = [self.spans[i] for i in idx]
        self.starts = [self.starts[i] for i in idx]
        self.has_word = [self.has_word[i] for i in idx]
        self.words = [self.words[i] for i in idx]
        self.stepper.reorder(index)


def focus_sentences(questions: list[str], passages: list, retriever, truncate, keep: int) -> list:
    """The passages (R = B·K rows) cut to the `keep` sentences of each question's K passages that its query
    encoder ranks highest (cosine of the question and the sentence) among those holding a word of the asked type
    (`answer_type`; all when none does), in passage order; a passage with none keeps only its title. Copying from
    these points the small reader at the sentence that answers."""
    from rag.passages import sentence_splitter

    split = sentence_splitter()
    K = len(passages) // len(questions)
    out = []
    for b, question in enumerate(questions):
        mine = passages[b * K : (b + 1) * K]
        sents = [(k, s) for k, p in enumerate(mine) if p is not None for s in split(truncate(p.text))]
        chosen: set[int] = set()
        if sents:
            enc = retriever.encoder.tokenize([s for _, s in sents])
            with torch.inference_mode():
                q = retriever.encode([question])[0]
                vecs = retriever.encoder(**{k: v.to(retriever.encoder.device) for k, v in enc.items()})
            sims = vecs @ q
            # a "when" question reads a sentence with a date in it, when one of them has one
            kind, asked = answer_type(question), _not_answers(question)
            typed = torch.tensor([kind is not None and any(_fits(w, kind) for w in map(_bare_case, s.split())
                                                           if w and w.lower() not in asked) for _, s in sents])
            if typed.any():
                sims = sims.masked_fill(~typed, float("-inf"))
            chosen = set(sims.topk(min(keep, int(typed.sum()) or len(sents))).indices.tolist())
        for k, p in enumerate(mine):
            text = " ".join(s for j, (kk, s) in enumerate(sents) if kk == k and j in chosen)
            out.append(None if p is None else dataclasses.replace(p, text=text))
    return out
