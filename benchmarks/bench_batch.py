"""What batching buys on this machine: `answer()` one question at a time against `answer_batch` of the same
questions, and the batched prompt pass with each of its levers switched off, side by side in one process.

    python -m benchmarks.bench_batch [--batch 16] [--rounds 2] [--config configs/rag/demo.yaml]

Levers (rag/generation/batching.py): length groups (prompts of similar length run together instead of all padded to
the longest) and the shared prefix (the chat header and system prompt every prompt starts with, run once per batch).
Each round takes new NQ-open dev questions (never the first 8), and every variant of a round answers the same ones
in turn, so drift of the machine's speed falls on all of them alike. Seconds per question, mean over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import NQ_DEV, machine, table


def variants():
    """(name, batched?, patches): patches are (module attribute, value) pairs set for the variant's run."""
    import rag.generation.batching as g

    # every row fits the first group: all prompts in one pass, padded to the longest (GROUP_ROWS would also gate
    # the shared prefix)
    one_group = (g, "LENGTH_SLACK", 1.0)
    no_prefix = (g, "shared_prefix", lambda ids: 0)
    return [("answer() one at a time", False, []), ("answer_batch", True, []),
            ("answer_batch, one padded pass", True, [one_group]),
            ("answer_batch, no shared prefix", True, [no_prefix]),
            ("answer_batch, neither", True, [one_group, no_prefix])]


def run(pipe, questions: list[str], batched: bool, patches) -> tuple[float, list[str]]:
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    for m, name, value in patches:
        setattr(m, name, value)
    try:
        t = time.perf_counter()
        if batched:
            texts = [a.text for a in pipe.answer_batch(questions, batch_size=len(questions))]
        else:
            texts = [pipe.answer(q).text for q in questions]
        return (time.perf_counter() - t) / len(questions), texts
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="questions per batch (and per round)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default="configs/rag/demo.yaml")
    ap.add_argument("--data", default=str(NQ_DEV), help="a QA file (any format eval.qa reads)")
    args = ap.parse_args()
    from rag.pipeline import RagPipeline
    from rag.qa_data import read_qa

    questions = [e.question for e in read_qa(args.data)]
    pipe = RagPipeline.load(args.config)
    pipe.answer(questions[0])  # warm
    seconds: dict[str, list[float]] = {}
    same: dict[str, int] = {}
    for r in range(args.rounds):
        batch = questions[8 + r * args.batch : 8 + (r + 1) * args.batch]
        reference = None
        for name, batched, patches in variants():
            s, texts = run(pipe, batch, batched, patches)
            seconds.setdefault(name, []).append(s)
            reference = reference or texts
            same[name] = same.get(name, 0) + sum(a == b for a, b in zip(texts, reference, strict=True))
    base = statistics.mean(seconds["answer() one at a time"])
    rows = [{"how": name, "s a question": f"{statistics.mean(v):.3f}",
             "each round": " / ".join(f"{x:.2f}" for x in v), "vs one at a time": f"{base / statistics.mean(v):.2f}",
             "same answer as one at a time": f"{same[name]} of {args.batch * args.rounds}"}
            for name, v in seconds.items()]
    print(f"machine: {machine()}; {args.config}; batch {args.batch}, {args.rounds} rounds")
    print(table(rows))


if __name__ == "__main__":
    main()
