"""Evaluate open-domain QA: exact match, F1, retrieval answer-recall@k, BLEU-1 and ROUGE-L, per mode.

    python -m eval.qa --config configs/rag/demo.yaml --data ../shared/data/qa/nq-open.dev.jsonl --limit 500 \\
        --mode retrieval,token,sequence,closed-book,concat --out runs/eval/nq-demo

Modes, all on the same questions:
  sequence, token   RAG-sequence / RAG-token decoding over the top n_docs passages
  retrieval         retrieval only: answer-recall@1/5/20/100
  closed-book       the generator alone, no passages
  concat            the top n_docs passages joined into one prompt (what most RAG libraries do)

Writes OUT/predictions.MODE.jsonl (one line per question: question, gold, prediction, metrics, retrieved ids,
titles, scores), OUT/summary.json and OUT/summary.md. An interrupted run resumes: questions already in a
predictions file are not asked again. Scores are reported on all questions and on the "answerable" subset, whose
gold answer occurs somewhere in the index's passages.
"""

from __future__ import annotations

import rag.program  # noqa: F401 - first: the program's process settings, before torch loads

# isort: split
import argparse
import json
import logging
import sys
from pathlib import Path

from rag.errors import BadInput, RagError
from rag.metrics import example_scores, has_answer, in_normalised, normalize_answer, recall_at_k

log = logging.getLogger(__name__)

MODES = ("retrieval", "sequence", "token", "closed-book", "concat")
RECALL_KS = (1, 5, 20, 100)


def answerable(examples, pipe) -> list[bool]:
    """Whether a gold answer occurs in some passage of the index (normalised, whole words; regex for patterns).

    Streams the index's passages chunk by chunk: the corpus is never held as one string."""
    out = [False] * len(examples)
    for texts in pipe.passage_texts():
        normalised = " " + " ".join(normalize_answer(t) for t in texts) + " "
        raw = "\n".join(texts)
        for i, e in enumerate(examples):
            if not out[i]:
                out[i] = has_answer(raw, e.answers, patterns=True) if e.patterns else in_normalised(normalised,
                                                                                                   e.answers)
    return out


def _done(path: Path) -> dict[int, dict]:
    """Records of an earlier, interrupted run (a torn last line is dropped and asked again)."""
    done = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue
            done[rec["index"]] = rec
    return done


def run_mode(pipe, mode: str, examples, flags: list[bool], out: Path, n_docs: int, batch_size: int,
             decoding: dict, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    path = out / f"predictions.{mode}.jsonl"
    done = _done(path)
    todo = [i for i in range(len(examples)) if i not in done]
    if done:
        log.info("%s: %d of %d questions already done in %s", mode, len(done), len(examples), path)
        path.write_text("".join(json.dumps(done[i], ensure_ascii=False) + "\n" for i in sorted(done)),
                        encoding="utf-8")  # drop a torn last line before appending
    bar = tqdm(total=len(examples), initial=len(done), desc=mode, disable=not progress)
    with open(path, "a", encoding="utf-8") as f:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            for i, rec in zip(chunk, _ask(pipe, mode, [examples[i] for i in chunk], n_docs, decoding), strict=True):
                done[i] = rec = {"index": i, "id": examples[i].id, "answerable": flags[i], **rec}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    return [done[i] for i in range(len(examples))]


def _ask(pipe, mode: str, examples, n_docs: int, decoding: dict) -> list[dict]:
    questions = [e.question for e in examples]
    if mode == "retrieval":
        out = []
        for e, hits in zip(examples, pipe.retrieve(questions, max(RECALL_KS)), strict=True):
            texts = [h.text for h in hits]
            out.append({"question": e.question, "gold": list(e.answers), "prediction": None,
                        **{f"recall@{k}": recall_at_k(texts, e.answers, k, e.patterns) for k in RECALL_KS},
                        "retrieved": [h.id for h in hits[:n_docs]], "titles": [h.title for h in hits[:n_docs]],
                        "scores": [round(h.score, 4) for h in hits[:n_docs]]})
        return out
    if mode in ("sequence", "token"):
        answers = pipe.answer_batch(questions, mode=mode, n_docs=n_docs, decoding=decoding or None)
    elif mode == "closed-book":
        answers = pipe.answer_batch(questions, mode="token", decoding=decoding or None,
                                    passages=[[None] for _ in questions])
    else:  # concat: the top passages, best first, as one passage of n_docs times the usual length
        answers = _concat(pipe, questions, n_docs, decoding)
    out = []
    for e, a in zip(examples, answers, strict=True):
        texts = [p.text for p in a.passages]
        out.append({"question": e.question, "gold": list(e.answers), "prediction": a.text,
                    **example_scores(a.text, texts, e, n_docs),
                    "retrieved": [p.id for p in a.passages], "titles": [p.title for p in a.passages],
                    "scores": [round(p.score, 4) for p in a.passages],
                    "posteriors": [round(p.posterior, 4) for p in a.passages]})
    return out


def _concat(pipe, questions: list[str], n_docs: int, decoding: dict):
    from rag.retrieval.passages import PassageRecord

    joined = [[PassageRecord(id="+".join(h.id for h in hits), doc_id="", title=hits[0].title,
                       text="\n\n".join(f"{h.title}: {h.text}" for h in hits))]
              for hits in pipe.retrieve(questions, n_docs)]
    return pipe.answer_batch(questions, mode="token", decoding=decoding or None, passages=joined,
                             context_length=pipe.cfg.generator.max_context_length * n_docs)


def summarise(records: list[dict], mode: str, n_docs: int) -> dict:
    """Mean of every metric on all questions and on the answerable subset."""
    keys = [f"recall@{k}" for k in RECALL_KS] if mode == "retrieval" else \
        ["em", "f1", "bleu1", "rouge_l", f"recall@{n_docs}"]
    out = {}
    for subset, rows in (("all", records), ("answerable", [r for r in records if r["answerable"]])):
        out[subset] = {"n": len(rows)}
        for k in keys:
            vals = [r[k] for r in rows if r.get(k) is not None]
            if vals:
                out[subset][k] = 100 * sum(vals) / len(vals)
    return out


def markdown(summary: dict, modes: list[str], n_docs: int) -> str:
    cols = ["em", "f1", "bleu1", "rouge_l", f"recall@{n_docs}", *(f"recall@{k}" for k in RECALL_KS)]
    cols = list(dict.fromkeys(cols))
    lines = ["| mode | questions | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for mode in modes:
        for subset in ("all", "answerable"):
            row = summary[mode][subset]
            cells = [f"{row[c]:.1f}" if c in row else "" for c in cols]
            lines.append(f"| {mode} ({subset}) | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class RunMismatch(RagError):
    """An output folder that holds predictions of another evaluation."""


def _check_run(out: Path, pipe, examples, n_docs: int, decoding: dict) -> None:
    """Resume only the same evaluation: the same questions and answers, RAG config, k and decoding. The first run
    writes OUT/run.json; a later one with other settings is refused, naming what differs."""
    import hashlib

    from rag.config import to_dict

    data = hashlib.sha256(json.dumps([(e.question, list(e.answers)) for e in examples]).encode()).hexdigest()[:16]
    run = {"questions": len(examples), "data": data, "n_docs": n_docs, "decoding": decoding,
           "config": json.loads(json.dumps(to_dict(pipe.cfg), default=str))}
    path = out / "run.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in run if saved.get(k) != run[k]]
        if diff:
            raise RunMismatch(f"{out} holds predictions of another evaluation ({', '.join(diff)} differ, see "
                              f"{path}); use another --out, or delete it to start over")
    else:
        path.write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")


def evaluate(pipe, examples, modes: list[str], out: Path, n_docs: int | None = None, batch_size: int = 8,
             decoding: dict | None = None, progress: bool = True) -> dict:
    n_docs = pipe.cfg.n_docs if n_docs is None else n_docs
    if n_docs < 1 or batch_size < 1:
        raise BadInput(f"n_docs and batch_size must be >= 1, got {n_docs} and {batch_size}")
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, pipe, examples, n_docs, decoding or {})
    flags = answerable(examples, pipe)
    summary = {}
    for mode in modes:
        records = run_mode(pipe, mode, examples, flags, out, n_docs, batch_size, decoding or {}, progress)
        summary[mode] = summarise(records, mode, n_docs)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(summary, modes, n_docs), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rag-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/rag/demo.yaml", help="a RAG config YAML or a save_pretrained folder")
    ap.add_argument("--data", required=True, help="QA file: NQ-open JSON Lines, WebQuestions, TriviaQA, "
                    "CuratedTREC; or some of its rows: file.jsonl[500:800]")
    ap.add_argument("--format", default="auto", choices=["auto", "jsonl", "webquestions", "triviaqa", "curatedtrec"])
    ap.add_argument("--question-field", default="question", help="JSON Lines: the question's field")
    ap.add_argument("--answer-field", default="answer", help="JSON Lines: the answers' field (a list or a string)")
    ap.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="malformed records")
    ap.add_argument("--limit", type=int, default=None, help="the first N questions only")
    ap.add_argument("--mode", default="token", help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--n-docs", type=int, default=None, help="passages per question (default: the config's)")
    ap.add_argument("--beams", type=int, default=None, help="beam size (default: the config's decoding)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a RAG config key")
    ap.add_argument("--out", default="runs/eval", help="folder for predictions and the summary")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    from rag.errors import quiet_logging, run_cli

    quiet_logging()
    return run_cli(lambda: _run(ap, args))


def _run(ap, args) -> int:
    from rag.qa_data import QAReport, read_qa
    from rag.retrieval.passages import CorpusError

    for name in ("limit", "n_docs", "batch_size", "beams", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"unknown mode {bad}: choose from {', '.join(MODES)}")
    decoding = {k: v for k, v in (("num_beams", args.beams), ("max_new_tokens", args.max_new_tokens))
                if v is not None}
    report = QAReport()
    examples = read_qa(args.data, args.format, args.on_error, args.question_field, args.answer_field, report)
    examples = examples[: args.limit] if args.limit is not None else examples
    if not examples:
        raise CorpusError(f"no questions with answers in {args.data}")
    log.info("%d questions (%d without answers, %d malformed skipped)", len(examples), report.skipped_no_answer,
             report.skipped_malformed)
    from rag.first_use import load_pipeline

    pipe = load_pipeline(args.config, tuple(args.set))  # a config's missing index is built first
    summary = evaluate(pipe, examples, modes, Path(args.out).expanduser(), args.n_docs, args.batch_size, decoding,
                       progress=not args.quiet)
    print(markdown(summary, modes, args.n_docs or pipe.cfg.n_docs), end="")  # n_docs is >= 1 or None here
    print(f"predictions and summary in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
