"""Machine-translate QA questions with a local causal LM, for translate-train (training a retriever or reader on
questions in the languages it will be asked in, where no translated training set is offline).

    python -m eval.translate --data ../shared/data/qa/nq-open.dev.jsonl[500:] --to pl --limit 3000 \
        --out runs/translated/pl.jsonl

Few-shot prompting (the examples below, written for this file, none from an evaluation set) of a base model, greedy,
one line per question. The output is JSON Lines with `question` (translated), `answer` (unchanged: names, dates and
numbers copy across languages), `en` (the source question) and `lang`; any QA reader of this project reads it. The
file is appended batch by batch, so a run that stops resumes where it left off. Translations from a 270M model are
noisy (wh-words especially); the answer-bearing names and numbers mostly survive, which is what a retriever needs.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from rag.errors import RagError, run_cli
from rag.qa_data import read_qa

SHOTS = {  # (English, translation): questions written for this file, in NQ's lower-case style
    "pl": [("who wrote the novel the lord of the rings", "kto napisał powieść władca pierścieni"),
           ("when did the first world war start", "kiedy wybuchła pierwsza wojna światowa"),
           ("what is the largest city in australia", "jakie jest największe miasto w australii"),
           ("how many players are on a football team", "ilu zawodników jest w drużynie piłkarskiej"),
           ("where was albert einstein born", "gdzie urodził się albert einstein"),
           ("who plays harry potter in the movies", "kto gra harry'ego pottera w filmach")],
    "ru": [("who wrote the novel the lord of the rings", "кто написал роман властелин колец"),
           ("when did the first world war start", "когда началась первая мировая война"),
           ("what is the largest city in australia", "какой самый большой город в австралии"),
           ("how many players are on a football team", "сколько игроков в футбольной команде"),
           ("where was albert einstein born", "где родился альберт эйнштейн"),
           ("who plays harry potter in the movies", "кто играет гарри поттера в фильмах")],
    "pt": [("who wrote the novel the lord of the rings", "quem escreveu o romance o senhor dos anéis"),
           ("when did the first world war start", "quando começou a primeira guerra mundial"),
           ("what is the largest city in australia", "qual é a maior cidade da austrália"),
           ("how many players are on a football team", "quantos jogadores há em um time de futebol"),
           ("where was albert einstein born", "onde nasceu albert einstein"),
           ("who plays harry potter in the movies", "quem interpreta harry potter nos filmes")],
}
NAMES = {"pl": "Polish", "ru": "Russian", "pt": "Portuguese"}


def prompt(question: str, lang: str) -> str:
    shots = "".join(f"English: {e}\n{NAMES[lang]}: {t}\n\n" for e, t in SHOTS[lang])
    return f"{shots}English: {question}\n{NAMES[lang]}:"


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def questions(entries: list[str], limit: int | None, seed: int) -> list:
    from rag.train import data_rows

    pool = []
    for entry in entries:
        path, rows = data_rows(entry)
        pool.extend(read_qa(path)[rows])
    random.Random(seed).shuffle(pool)  # a sample drawn across the files, the same on every run (resume)
    return pool[:limit] if limit else pool


def translate(examples: list, lang: str, out: Path, model_name: str, batch_size: int) -> int:
    """Append translations of `examples` to `out`, skipping the ones a previous run wrote; returns how many exist."""
    import torch
    from tqdm.auto import tqdm

    from rag.precision import resolve_precision
    from rag.weights import load_causal_lm

    done = _complete_lines(out)
    todo = examples[done:]
    if not todo:
        return done
    model, tok = load_causal_lm(model_name)
    if model is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model, tok = AutoModelForCausalLM.from_pretrained(model_name), AutoTokenizer.from_pretrained(model_name)
    model = model.to(resolve_precision("auto", torch.device("cpu"))).eval()
    tok.padding_side = "left"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f, torch.inference_mode():
        for start in tqdm(range(0, len(todo), batch_size), desc=f"translating to {lang}", unit="batch"):
            batch = todo[start:start + batch_size]
            enc = tok([prompt(ex.question, lang) for ex in batch], return_tensors="pt", padding=True)
            longest = max(len(tok(ex.question).input_ids) for ex in batch)
            ids = model.generate(**enc, max_new_tokens=2 * longest + 8, do_sample=False)
            texts = tok.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            for ex, text in zip(batch, texts, strict=True):
                f.write(json.dumps({"question": first_line(text) or ex.question, "answer": list(ex.answers),
                                    "en": ex.question, "lang": lang}, ensure_ascii=False) + "\n")
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
    ap.add_argument("--to", required=True, help=f"target language: {', '.join(SHOTS)}")
    ap.add_argument("--out", required=True, type=Path, help="JSON Lines written (appended: a rerun resumes)")
    ap.add_argument("--limit", type=int, default=None, help="translate a random sample of this many questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="google/gemma-3-270m", help="a causal LM (GGUF packages or hub name)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    if args.to not in SHOTS:
        raise RagError(f"--to {args.to}: no few-shot examples for it; known: {', '.join(SHOTS)}")
    n = translate(questions(args.data, args.limit, args.seed), args.to, args.out, args.model, args.batch_size)
    print(f"{n} questions in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
