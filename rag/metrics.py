"""QA metrics: SQuAD-normalised exact match and token F1 (max over gold answers), regular-expression match
(CuratedTREC), retrieval answer-recall (a gold answer string inside a retrieved passage), and for generation tasks
BLEU-1 (nltk) and ROUGE-L (longest common subsequence F-measure), both on normalised tokens."""

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


def _pattern_hit(patterns: Iterable[str], text: str, find) -> bool:
    for pattern in patterns:
        try:
            if find(pattern, text, flags=re.IGNORECASE | re.UNICODE) is not None:
                return True
        except re.error:  # a malformed gold pattern matches nothing
            continue
    return False


def regex_match(prediction: str, patterns: Iterable[str]) -> float:
    """CuratedTREC: a gold answer is a regular expression matched (case-insensitively) at the prediction's start."""
    return float(_pattern_hit(patterns, prediction, re.match))


def has_answer(text: str, golds: Iterable[str], patterns: bool = False) -> bool:
    """A normalised gold answer occurs in the normalised text as whole words (with `patterns`, a gold regular
    expression matches somewhere in the text, as DPR scores CuratedTREC)."""
    if patterns:
        return _pattern_hit(golds, text, re.search)
    return in_normalised(f" {normalize_answer(text)} ", golds)


def passage_has_answer(passage, golds: Iterable[str]) -> bool:
    """A gold answer occurs in the passage's title or text (the generator's prompt shows both); never in a missing
    hit (None)."""
    if passage is None:
        return False
    return has_answer(f"{passage.title}\n{passage.text}", golds)


def in_normalised(hay: str, golds: Iterable[str]) -> bool:
    """A normalised gold answer occurs as whole words in `hay`, an already normalised text with a space at each
    end (so that a large text is normalised once for many questions)."""
    return any(n and f" {n} " in hay for n in (normalize_answer(g) for g in golds))


def recall_at_k(passages: list[str], golds: Iterable[str], k: int, patterns: bool = False) -> float:
    golds = list(golds)
    return float(any(has_answer(p, golds, patterns) for p in passages[:k]))


def bleu1(prediction: str, golds: Iterable[str]) -> float:
    """Sentence BLEU-1 of the prediction against every gold answer as references (nltk), normalised tokens."""
    from nltk.translate.bleu_score import sentence_bleu

    hyp = normalize_answer(prediction).split()
    refs = [r for r in (normalize_answer(g).split() for g in golds) if r]
    if not hyp or not refs:
        return float(not hyp and not refs)
    if not set(hyp) & {w for r in refs for w in r}:
        return 0.0  # no unigram in common (nltk would say so with a warning)
    return float(sentence_bleu(refs, hyp, weights=(1.0,)))


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, golds: Iterable[str]) -> float:
    """ROUGE-L F1 (longest common subsequence of normalised tokens), max over gold answers."""
    p = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        g = normalize_answer(gold).split()
        if not p or not g:
            best = max(best, float(p == g))
            continue
        lcs = _lcs(p, g)
        if lcs:
            precision, recall = lcs / len(p), lcs / len(g)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def score_answer(prediction: str, golds: Iterable[str], patterns: bool = False) -> dict[str, float]:
    """Every answer metric of one prediction: em, f1, bleu1, rouge_l; regex patterns (CuratedTREC) give their match
    for all four, as token overlap with a pattern means nothing."""
    golds = list(golds)
    if patterns:
        em = regex_match(prediction, golds)
        return {"em": em, "f1": em, "bleu1": em, "rouge_l": em}
    return {"em": exact_match(prediction, golds), "f1": f1_score(prediction, golds),
            "bleu1": bleu1(prediction, golds), "rouge_l": rouge_l(prediction, golds)}


def example_scores(prediction: str, passage_texts: list[str], example, k: int) -> dict:
    """The scores of one answer to a QA example (rag.qa_data.QAExample): exact match, F1, BLEU-1, ROUGE-L and
    answer-recall@k of the passages it came from (None without passages). Shared by eval and training."""
    recall = recall_at_k(passage_texts, example.answers, k, example.patterns) if passage_texts else None
    return {**score_answer(prediction, example.answers, example.patterns), f"recall@{k}": recall}
