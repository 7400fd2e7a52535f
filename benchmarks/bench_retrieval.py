"""The paper's retrieval ablation (Table 6) on the demo: dense with the base and the trained BERT_q, BM25 alone,
and hybrid, side by side in one run, answer-recall@1/5/20 on NQ-open dev (first N) and WebQuestions val, all
questions and the answerable subset (gold answer somewhere in the index).

    python -m benchmarks.bench_retrieval [--limit 500] [--tune 300] [--answers 0]

The hybrid's fusion (method, BM25 weight) is chosen on other questions (NQ-open dev rows after the evaluated ones,
WebQuestions train), never on the evaluated ones. It works on a copy of the demo index with its BM25 part added by
`index_builder update --set sparse.kind=bm25` (timed), and removes the copy. `--answers N` adds exact match over
the first N questions of each set for every row (about a second a question on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import NQ_DEV, machine

WQ = NQ_DEV.parent / "webquestions.val.json"
WQ_TRAIN = NQ_DEV.parent / "webquestions.train.json"
KS = (1, 5, 20)
SUMS = (0.1, 0.2, 0.3, 0.4, 0.5)


def recalls(pipe, examples, flags) -> dict:
    from rag.metrics import recall_at_k

    hits = []
    for s in range(0, len(examples), 64):
        chunk = examples[s : s + 64]
        hits += pipe.retrieve([e.question for e in chunk], max(KS))
    out = {}
    for subset in ("all", "answerable"):
        rows = [(e, h) for e, h, f in zip(examples, hits, flags, strict=True) if subset == "all" or f]
        out[subset] = {k: 100 * sum(recall_at_k([x.text for x in h], e.answers, k, e.patterns) for e, h in rows)
                       / max(1, len(rows)) for k in KS}
        out[subset]["n"] = len(rows)
    return out


def exact_match(pipe, examples, n: int) -> float:
    from rag.metrics import score_answer

    answers = pipe.answer_batch([e.question for e in examples[:n]])
    scored = [score_answer(a.text, e.answers, e.patterns)["em"] for a, e in zip(answers, examples, strict=False)]
    return 100 * sum(scored) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=500, help="NQ-open dev questions evaluated (the first N)")
    ap.add_argument("--tune", type=int, default=300, help="questions of each tuning set for choosing the fusion")
    ap.add_argument("--updates", type=int, default=0, metavar="N",
                    help="also time N rounds of `index_builder update` (100 documents replaced, 50 deleted) on the "
                         "index with and without its BM25 part, in turn, and skip the retrieval table")
    ap.add_argument("--fusion", nargs="*", default=None, metavar="KEY=VALUE",
                    help="skip the tuning and use this fusion (e.g. fusion.method=sum fusion.bm25_weight=0.2)")
    ap.add_argument("--answers", type=int, default=0, help="also exact match over the first N of each set")
    ap.add_argument("--adapter", action="append", default=[], metavar="LABEL=PATH",
                    help="a BERT_q adapter to compare too, dense and hybrid, under LABEL (e.g. 'BM25 hard "
                         "negatives=runs/demo-hardneg-lora/final/query_encoder'); repeatable")
    args = ap.parse_args(argv)
    from eval.qa import answerable
    from rag.first_use import load_pipeline
    from rag.pipeline import RagPipeline
    from rag.qa_data import read_qa

    print(f"machine: {machine()}")
    default = load_pipeline(None)  # the demo index, built if missing
    tmp = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    try:
        index = tmp / "demo"
        shutil.copytree(default.index_folder, index)
        if args.updates:
            shutil.copytree(default.index_folder, tmp / "dense-only")
        del default
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "index_builder", "update", "--index", str(index), "--set",
                        "sparse.kind=bm25", "--quiet"], check=True)
        print(f"BM25 part added to the demo index by `index_builder update` in {time.perf_counter() - t:.1f} s "
              "(the process, models and all)")
        if args.updates:
            time_updates(tmp, {"dense only": tmp / "dense-only", "dense + BM25": index}, args.updates)
            return 0
        sets = {"NQ-open dev": read_qa(NQ_DEV)[: args.limit], "WebQuestions val": read_qa(WQ)}
        tune = read_qa(NQ_DEV)[args.limit : args.limit + args.tune] + read_qa(WQ_TRAIN)[: args.tune]
        base = RagPipeline.load(None, (f"index={index}",))
        flags = {name: answerable(ex, base) for name, ex in sets.items()}
        tune_flags = answerable(tune, base)
        if args.fusion is None:
            fusion = choose_fusion(index, tune, tune_flags)
            print(f"fusion chosen on {len(tune)} other questions (answerable recall@5): {fusion}")
        else:
            fusion = tuple(args.fusion)
        rows = {
            "dense, base BERT_q (the paper's frozen)": ("query_encoder.adapter=null",),
            "dense, trained BERT_q (the default)": (),
            "BM25 (RAG-BM25)": ("retrieval=bm25",),
            "hybrid, base BERT_q": ("query_encoder.adapter=null", "retrieval=hybrid", *fusion),
            "hybrid, trained BERT_q": ("retrieval=hybrid", *fusion),
        }
        for entry in args.adapter:
            label, _, path = entry.rpartition("=")
            label = label or path
            rows[f"dense, BERT_q: {label}"] = (f"query_encoder.adapter={path}",)
            rows[f"hybrid, BERT_q: {label}"] = (f"query_encoder.adapter={path}", "retrieval=hybrid", *fusion)
        report = {}
        for row, overrides in rows.items():
            pipe = RagPipeline.load(None, (f"index={index}", *overrides))
            report[row] = {name: recalls(pipe, ex, flags[name]) for name, ex in sets.items()}
            report[row]["latency_ms"] = _latency(pipe, sets["NQ-open dev"][:50])
            if args.answers:
                report[row]["em"] = {name: exact_match(pipe, ex, args.answers) for name, ex in sets.items()}
            del pipe
        print_table(report, sets, args.answers)
        print(json.dumps(report))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def time_updates(tmp: Path, folders: dict[str, Path], rounds: int) -> None:
    """Seconds of one `index_builder update` process (100 documents replaced with edited text, 50 deleted) per
    folder, the folders in turn each round: what keeping BM25 in step costs."""
    from rag.config import CorpusConfig
    from rag.retrieval.passages import read_corpus

    docs = list(read_corpus(CorpusConfig(format="demo")))
    times = {name: [] for name in folders}
    for r in range(rounds):
        chosen = docs[r * 150 : r * 150 + 150]
        replace = tmp / f"replace{r}.jsonl"
        replace.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text + " (edited)"}) + "\n"
                                   for d in chosen[:100]))
        (tmp / f"delete{r}.txt").write_text("".join(d.id + "\n" for d in chosen[100:]))
        for name, folder in folders.items():
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "index_builder", "update", "--index", str(folder), "--replace",
                            str(replace), "--delete", str(tmp / f"delete{r}.txt"), "--quiet"], check=True,
                           capture_output=True)
            times[name].append(time.perf_counter() - t)
    base = sorted(times["dense only"])[len(times["dense only"]) // 2]
    for name, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        print(f"update, {name}: median {median:.2f} s of {rounds} (min {min(ts):.2f}, max {max(ts):.2f}); "
              f"{median / base:.2f}x dense only")


def choose_fusion(index: Path, tune, flags) -> tuple[str, ...]:
    """The fusion with the best answerable recall@5 on the tuning questions."""
    from rag.pipeline import RagPipeline

    candidates = [("fusion.method=rrf",)] + [("fusion.method=sum", f"fusion.bm25_weight={w}") for w in SUMS]
    scored = []
    for c in candidates:
        pipe = RagPipeline.load(None, (f"index={index}", "retrieval=hybrid", *c))
        r = recalls(pipe, tune, flags)["answerable"]
        print(f"  tuning {' '.join(c)}: recall@1/5/20 {r[1]:.1f} / {r[5]:.1f} / {r[20]:.1f}")
        scored.append((r[5], r[20], c))
    return max(scored)[2]


def _latency(pipe, examples) -> float:
    """Median milliseconds of one warm retrieve(k=20)."""
    pipe.retrieve(examples[0].question, 20)
    times = []
    for e in examples:
        t = time.perf_counter()
        pipe.retrieve(e.question, 20)
        times.append(1000 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def print_table(report: dict, sets: dict, answers: int) -> None:
    head = "| retrieval | " + " | ".join(f"{n} recall@1/5/20 (all · answerable)" for n in sets) + \
        " | warm retrieve ms |" + (" EM |" if answers else "")
    print(head)
    print("|---" * (len(sets) + 2 + bool(answers)) + "|")
    for row, r in report.items():
        cells = []
        for name in sets:
            a, b = r[name]["all"], r[name]["answerable"]
            cells.append(f"{a[1]:.1f}/{a[5]:.1f}/{a[20]:.1f} · {b[1]:.1f}/{b[5]:.1f}/{b[20]:.1f}")
        em = " | " + " · ".join(f"{v:.1f}" for v in r["em"].values()) if answers else ""
        print(f"| {row} | " + " | ".join(cells) + f" | {r['latency_ms']:.1f}{em} |")
    print("answerable: " + ", ".join(f"{n} {report[next(iter(report))][n]['answerable']['n']} of "
                                     f"{report[next(iter(report))][n]['all']['n']}" for n in sets))


if __name__ == "__main__":
    sys.exit(main())
