"""Incremental updates of the demo index against a full rebuild, in one run.

    python benchmarks/bench_update.py [--questions 300]

The demo corpus less a random 1% of its documents is built (flat); then an update adds that 1% and deletes another
0.5%. A fresh build over the same final corpus is timed as the full rebuild, and both are searched with NQ-open dev
questions: top-10 passage ids must be equal for flat; for hnsw and ivfpq (re-indexed from the stored vectors with
`compact`, then updated the same way) recall@10 against exact search over the final corpus is reported for the
updated index and for a fresh one of the same type, with their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, matmul_gflops, table
from index_builder.build import build
from index_builder.update import compact, update
from rag.config import BuildConfig, CorpusConfig, EncoderConfig, load_config
from rag.retrieval.encoders import Encoder
from rag.retrieval.index import DenseIndex
from rag.retrieval.passages import read_corpus

REPO = Path(__file__).resolve().parents[1]
KINDS = {"hnsw": {"type": "hnsw", "hnsw_m": 32, "ef_construction": 80, "ef_search": 256},
         "ivfpq": {"type": "ivfpq", "nlist": 256, "pq_m": 48, "nprobe": 64, "rerank": 300}}


def write(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in docs))
    return path


def top_ids(index: DenseIndex, q: np.ndarray, k: int = 10) -> list[list[str]]:
    return [[p.id for p in index.passages(row)] for row in index.search(q, k).ids]


def recall(got, want) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-update-"))
    work.mkdir(parents=True, exist_ok=True)
    rate = matmul_gflops()

    docs = list(read_corpus(CorpusConfig(format="demo")))
    rng = random.Random(0)
    rng.shuffle(order := list(range(len(docs))))
    n_add, n_del = len(docs) // 100, len(docs) // 200
    added = [docs[i] for i in sorted(order[:n_add])]
    deleted = [docs[i] for i in sorted(order[n_add : n_add + n_del])]
    base_docs = [d for i, d in enumerate(docs) if i not in set(order[:n_add])]
    final_docs = [d for d in base_docs if d.id not in {x.id for x in deleted}] + added
    write(work / "add.jsonl", added)
    (work / "delete.txt").write_text("".join(d.id + "\n" for d in deleted))

    def full_build(name, corpus_docs):
        corpus = write(work / f"{name}.jsonl", corpus_docs)
        cfg = load_config(BuildConfig, REPO / "configs/index/demo.yaml",
                          [f"output={work / name}", "corpus.format=jsonl", f"corpus.path={corpus}"])
        t = time.perf_counter()
        build(cfg, overwrite=True, progress=False)
        return work / name, time.perf_counter() - t

    base, _ = full_build("base", base_docs)
    base_copies = {k: work / f"base-{k}" for k in KINDS}
    for kind, path in base_copies.items():
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path)
        compact(path, index=KINDS[kind], progress=False)
    t = time.perf_counter()
    update(base, add=str(work / "add.jsonl"), delete=str(work / "delete.txt"), progress=False)
    t_update = time.perf_counter() - t
    fresh, t_full = full_build("fresh", final_docs)

    questions = [json.loads(line)["question"] for line in
                 (REPO.parent / "shared/data/qa/nq-open.dev.jsonl").read_text().splitlines()[: args.questions]]
    encoder = Encoder.from_config(EncoderConfig(name="sentence-transformers/all-MiniLM-L6-v2", title="prefix",
                                                device="cpu"))
    q = encoder.encode(questions)
    truth = top_ids(DenseIndex.load(fresh), q)  # exact search over the final corpus
    got = top_ids(DenseIndex.load(base), q)
    rows = [{"index": "flat", "update s": t_update, "full rebuild s": t_full, "update / rebuild": t_update / t_full,
             "recall@10 updated": recall(got, truth), "recall@10 fresh": 1.0, "updated / fresh": recall(got, truth),
             "same top-10 as fresh": np.mean([a == b for a, b in zip(got, truth, strict=True)])}]
    for kind, path in base_copies.items():
        t = time.perf_counter()
        update(path, add=str(work / "add.jsonl"), delete=str(work / "delete.txt"), progress=False)
        t_kind = time.perf_counter() - t
        fresh_kind = work / f"fresh-{kind}"
        shutil.rmtree(fresh_kind, ignore_errors=True)
        shutil.copytree(fresh, fresh_kind)
        compact(fresh_kind, index=KINDS[kind], progress=False)
        got, want = top_ids(DenseIndex.load(path), q), top_ids(DenseIndex.load(fresh_kind), q)
        r_got, r_want = recall(got, truth), recall(want, truth)
        rows.append({"index": kind, "update s": t_kind, "full rebuild s": t_full, "update / rebuild": t_kind / t_full,
                     "recall@10 updated": r_got, "recall@10 fresh": r_want, "updated / fresh": r_got / r_want,
                     "same top-10 as fresh": np.mean([a == b for a, b in zip(got, want, strict=True)])})
    print(f"machine: {machine()}; fp32 matmul {rate:.1f} GFLOP/s; demo corpus {len(docs)} documents: "
          f"+{n_add} added, -{n_del} deleted; {len(questions)} NQ-open dev questions")
    print(table(rows))


if __name__ == "__main__":
    main()
