"""Machine-translate QA questions with a local causal LM, for translate-train (training a retriever or reader on
questions in the languages it will be asked in, where no translated training set is offline).

    python -m eval.translate --data ../shared/data/qa/nq-open.dev.jsonl[500:] --to pl --limit 3000 \
        --out runs/translated/pl.jsonl

Few-shot prompting (rag/translate.py: its examples written for it, none from an evaluation set) of a base model, greedy,
one line per question, from English or into it (`--from pl --to en` translates questions at test time). The output
is JSON Lines with `question` (translated), `answer` (unchanged: names, dates and numbers copy across languages),
`source` (the question translated), `from` and `lang`; any QA reader of this project reads it. The
file is appended batch by batch, so a run that stops resumes where it left off. Translations from a 270M model are
noisy (wh-words especially); the answer-bearing names and numbers mostly survive, which is what a retriever needs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from rag.errors import run_cli
from rag.qa_data import read_qa
from rag.translate import NAMES, Translator, check_pair


def questions(entries: list[str], limit: int | None, seed: int, field: str = "question") -> list:
    pool = []
    for entry in entries:
        pool.extend(read_qa(entry, question_field=field))
    if limit:  # a sample drawn across the files, the same on every run (resume); without a limit, the file order
        random.Random(seed).shuffle(pool)
    return pool[:limit] if limit else pool


def translate(examples: list, src: str, dst: str, out: Path, model_name: str, batch_size: int) -> int:
    """Append translations of `examples` to `out`, skipping the ones a previous run wrote; returns how many exist."""
    from tqdm.auto import tqdm

    done = _complete_lines(out)
    todo = examples[done:]
    if not todo:
        return done
    translator = Translator(src, dst, model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in tqdm(range(0, len(todo), batch_size), desc=f"translating {src} to {dst}", unit="batch"):
            batch = todo[start:start + batch_size]
            for ex, text in zip(batch, translator([ex.question for ex in batch]), strict=True):
                f.write(json.dumps({"question": text or ex.question, "answer": list(ex.answers),
                                    "source": ex.question, "from": src, "lang": dst}, ensure_ascii=False) + "\n")
            f.flush()
    return done + len(todo)


def _complete_lines(out: Path) -> int:
    """How many whole lines `out` holds; a line cut by a crash is dropped, so the resume writes it again."""
    if not out.is_file():
        return 0
    text = out.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        out.write_text(text, encoding="utf-8")
    return text.count("\n")


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="QA files, each optionally with rows: file.jsonl[500:]")
    ap.add_argument("--to", required=True, help=f"target language: {', '.join(NAMES)}")
    ap.add_argument("--from", dest="src", default="en", help="the questions' language (one side is English)")
    ap.add_argument("--question-field", default="question", help="the JSON Lines field holding the question")
    ap.add_argument("--out", required=True, type=Path, help="JSON Lines written (appended: a rerun resumes)")
    ap.add_argument("--limit", type=int, default=None, help="translate a random sample of this many questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="google/gemma-3-270m", help="a causal LM (GGUF packages or hub name)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    check_pair(args.src, args.to)
    examples = questions(args.data, args.limit, args.seed, args.question_field)
    n = translate(examples, args.src, args.to, args.out, args.model, args.batch_size)
    print(f"{n} questions in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
