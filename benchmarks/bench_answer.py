"""Latency and memory of the embedded default: a cold `rag ask` (process start to printed answer) and warm
`answer()` calls, index already built.

    python benchmarks/bench_answer.py [--questions 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from benchmarks.common import machine, matmul_gflops, rss_mib, run_module, table

QUESTIONS = [
    "Who wrote Pride and Prejudice?", "What is the capital of France?", "Who painted the Mona Lisa?",
    "When did the first man land on the moon?", "What is the largest planet in the solar system?",
    "Who developed the theory of relativity?", "What language is spoken in Brazil?",
    "Which ocean is the largest?", "Who composed the Magic Flute?", "What is the chemical symbol for gold?",
    "Who was the first president of the United States?", "Where is the Eiffel Tower?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--config", default="configs/rag/demo.yaml")
    args = ap.parse_args()
    rate = matmul_gflops()

    cold_s, cold_peak, out = run_module("rag", ["ask", QUESTIONS[0], "--config", args.config, "--json"])
    cold_answer = json.loads(out)["text"]
    # RAG-sequence with beams per passage: k x beams hypotheses rescored under k passages (README, "Ask")
    seq_s, seq_peak, out = run_module("rag", ["ask", QUESTIONS[0], "--config", args.config, "--json", "--mode",
                                              "sequence", "--beams", "4", "--n-docs", "10"])
    seq_answer = json.loads(out)["text"]

    from rag.pipeline import RagPipeline

    t = time.perf_counter()
    pipe = RagPipeline.load(args.config)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    pipe.answer(QUESTIONS[0])
    first_s = time.perf_counter() - t
    times, answers = [], []
    for q in QUESTIONS[1 : args.questions + 1]:
        t = time.perf_counter()
        answers.append((q, pipe.answer(q).text))
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {machine()}; fp32 matmul {rate:.1f} GFLOP/s; config {args.config}")
    print(table([
        {"what": "cold `rag ask` (process start to printed answer)", "seconds": cold_s, "peak MiB": cold_peak,
         "limit": "<= 30 s, <= 2560 MiB"},
        {"what": "cold `rag ask --mode sequence --beams 4 --n-docs 10`", "seconds": seq_s, "peak MiB": seq_peak,
         "limit": "<= 2560 MiB"},
        {"what": "RagPipeline.load (models + index)", "seconds": load_s, "peak MiB": rss_mib(), "limit": ""},
        {"what": "first answer() in the process", "seconds": first_s, "peak MiB": peak, "limit": ""},
        {"what": f"warm answer(), median of {len(times)}", "seconds": statistics.median(times), "peak MiB": peak,
         "limit": "<= 4 s"},
        {"what": "warm answer(), max", "seconds": max(times), "peak MiB": peak, "limit": ""},
    ]))
    print(f"\ncold answer: {cold_answer!r}; RAG-sequence, 4 beams, k=10: {seq_answer!r}")
    for q, a in answers:
        print(f"- {q} -> {a}")


if __name__ == "__main__":
    main()
