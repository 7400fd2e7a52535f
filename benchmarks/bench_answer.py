"""Latency and memory of the embedded default in each precision, side by side in one run: a cold `rag ask` (process
start to printed answer), the RAG-sequence k=10 beam-4 peak, load, warm `answer()` and `answer_batch` at batch 8.
The index must be built (`rag ask` once).

    python -m benchmarks.bench_answer [--questions 10] [--precisions float32,bfloat16]
    python -m benchmarks.bench_answer --threads     # warm answer() alone and beside a busy process, per policy

--threads: warm `answer()` in a fresh process per OpenMP policy (ACTIVE: spinning waits, libgomp's default;
PASSIVE: rag's default; one intra-op thread), alone and beside a competitor that keeps 2 threads busy with float32
matrix products (what an index build or a training run does), so the degradation under sharing is measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

from benchmarks.common import machine, matmul_gflops, run_module, table

QUESTIONS = [
    "Who wrote Pride and Prejudice?", "What is the capital of France?", "Who painted the Mona Lisa?",
    "When did the first man land on the moon?", "What is the largest planet in the solar system?",
    "Who developed the theory of relativity?", "What language is spoken in Brazil?",
    "Which ocean is the largest?", "Who composed the Magic Flute?", "What is the chemical symbol for gold?",
    "Who was the first president of the United States?", "Where is the Eiffel Tower?",
]


def measure(config: str, precision: str, n: int) -> dict:
    from rag.pipeline import RagPipeline

    knob = ["--set", f"precision={precision}"]
    cold_s, cold_peak, out = run_module("rag", ["ask", QUESTIONS[0], "--config", config, "--json", *knob])
    cold_answer = json.loads(out)["text"]
    # RAG-sequence with beams per passage: k x beams hypotheses rescored under k passages (docs/usage.md, "Ask")
    seq_s, seq_peak, out = run_module("rag", ["ask", QUESTIONS[0], "--config", config, "--json", "--mode", "sequence",
                                              "--beams", "4", "--n-docs", "10", *knob])
    t = time.perf_counter()
    pipe = RagPipeline.load(config, (f"precision={precision}",))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    pipe.answer(QUESTIONS[0])
    first_s = time.perf_counter() - t
    times, answers = [], []
    for q in QUESTIONS[1 : n + 1]:
        t = time.perf_counter()
        answers.append(pipe.answer(q).text)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    batch = pipe.answer_batch(QUESTIONS[:8], batch_size=8)
    batch_s = time.perf_counter() - t
    return {"precision": pipe.info()["precision"], "cold": cold_s, "cold peak": cold_peak, "seq": seq_s,
            "seq peak": seq_peak, "load": load_s, "first": first_s, "warm": statistics.median(times),
            "warm max": max(times), "batch": 8 / batch_s, "answers": [cold_answer, *answers],
            "batch answers": [a.text for a in batch], "seq answer": json.loads(out)["text"]}


ROWS = [
    ("cold", "cold `rag ask` (process start to printed answer), s"),
    ("cold peak", "cold `rag ask` peak MiB"),
    ("seq", "cold `rag ask --mode sequence --beams 4 --n-docs 10`, s"),
    ("seq peak", "that one's peak MiB (<= 2,560)"),
    ("load", "RagPipeline.load (models + index), s"),
    ("first", "first answer() in the process, s"),
    ("warm", "warm answer(), median, s"),
    ("warm max", "warm answer(), max, s"),
    ("batch", "answer_batch at batch 8, questions/s"),
]


THREAD_POLICIES = {"ACTIVE (libgomp default)": {"OMP_WAIT_POLICY": "ACTIVE"},
                   "PASSIVE (rag default)": {"OMP_WAIT_POLICY": "PASSIVE"},
                   "1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}}
WARM = ("import json, statistics, sys, time\nfrom rag.first_use import load_pipeline\n"
        "pipe = load_pipeline(sys.argv[1])\nqs = json.loads(sys.argv[2])\npipe.answer(qs[0])\nts = []\n"
        "for q in qs:\n    t = time.perf_counter(); pipe.answer(q); ts.append(time.perf_counter() - t)\n"
        "print(statistics.median(ts))\n")
BURN = ("import torch, time\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nend = time.time() + 3600\n"
        "while time.time() < end:\n    a @ a\n")


def threads(config: str, n: int) -> list[dict]:
    import os
    import subprocess
    import sys

    rows = []
    for name, env in THREAD_POLICIES.items():
        row = {"policy": name}
        for shared in (False, True):
            burner = subprocess.Popen([sys.executable, "-c", BURN], env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}) \
                if shared else None
            try:
                out = subprocess.run([sys.executable, "-c", WARM, config, json.dumps(QUESTIONS[:n])],
                                     env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
            finally:
                if burner:
                    burner.kill()
                    burner.wait()
            row["beside a busy process s" if shared else "alone s"] = float(out.split()[-1])
        row["shared / alone"] = row["beside a busy process s"] / row["alone s"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--threads", action="store_true", help="measure the OpenMP thread policies instead")
    ap.add_argument("--config", default="configs/rag/demo.yaml")
    ap.add_argument("--precisions", default="float32,bfloat16", help="comma-separated; the first is the baseline")
    args = ap.parse_args()
    rate = matmul_gflops()
    if args.threads:
        print(f"machine: {machine()}; warm answer() median of {args.questions} questions, {args.config}")
        print(table(threads(args.config, args.questions)))
        return
    names = [p.strip() for p in args.precisions.split(",") if p.strip()]
    got = {name: measure(args.config, name, args.questions) for name in names}
    base = got[names[0]]
    rows = []
    for key, what in ROWS:
        row = {"what": what}
        for name in names:
            row[got[name]["precision"]] = got[name][key]
        for name in names[1:]:  # > 1 is better for every row: time and memory inverted, throughput as is
            ratio = got[name][key] / base[key] if key == "batch" else base[key] / got[name][key]
            row[f"{got[name]['precision']} gain"] = ratio
        rows.append(row)
    print(f"machine: {machine()}; fp32 matmul {rate:.1f} GFLOP/s; config {args.config}; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(table(rows))
    for name in names:
        g = got[name]
        print(f"\n{g['precision']}: {g['answers']}\n  batch of 8: {g['batch answers']}\n  RAG-sequence k=10: "
              f"{g['seq answer']!r}")
    if len(names) > 1:
        same = sum(a == b for a, b in zip(base["answers"], got[names[1]]["answers"], strict=True))
        print(f"\nthe same answer in {same} of {len(base['answers'])} questions")


if __name__ == "__main__":
    main()
