"""QA metrics: SQuAD-normalised exact match and token F1 (max over gold answers), regular-expression match
(CuratedTREC), and retrieval answer-recall (a gold answer string inside a retrieved passage)."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, white space collapsed (NFD first, as
    DPR does, so that composed and decomposed accents compare equal)."""
    text = unicodedata.normalize("NFD", text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: Iterable[str]) -> float:
    return max((_f1(prediction, g) for g in golds), default=0.0)


def regex_match(prediction: str, patterns: Iterable[str]) -> float:
    """CuratedTREC: a gold answer is a regular expression matched (case-insensitively) at the prediction's start."""
    for pattern in patterns:
        try:
            if re.match(pattern, prediction, flags=re.IGNORECASE | re.UNICODE) is not None:
                return 1.0
        except re.error:
            continue
    return 0.0


def has_answer(text: str, golds: Iterable[str]) -> bool:
    """A normalised gold answer occurs in the normalised text as whole words."""
    hay = f" {normalize_answer(text)} "
    return any(n and f" {n} " in hay for n in (normalize_answer(g) for g in golds))


def recall_at_k(passages: list[str], golds: Iterable[str], k: int) -> float:
    golds = list(golds)
    return float(any(has_answer(p, golds) for p in passages[:k]))
