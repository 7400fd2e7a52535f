"""Streaming build: peak memory of building a 200k-passage index, and the cost of opening the finished folder.

    python -m benchmarks.bench_build [--passages 200000]
    python -m benchmarks.bench_build --demo [--precisions float32,bfloat16]   # the demo index, each precision

The corpus is generated (JSON Lines, one 100-word document a passage); the encoder is a tiny random BERT, so the
numbers measure the pipeline (reading, splitting, the Arrow store, shards, merge, FAISS), not the model.
Each step runs in its own process so that its peak resident memory is its own. `--demo` instead builds the real
demo index (configs/index/demo.yaml: 10,033 summaries, MiniLM) from scratch once per precision, side by side.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, table

REPO = Path(__file__).resolve().parents[1]

OPEN = """
import json, sys, time, psutil
import faiss, numpy, pyarrow  # the libraries, imported before the clock starts
from rag.retrieval.index import DenseIndex
proc = psutil.Process()
before = proc.memory_info().rss
t = time.perf_counter()
index = DenseIndex.load(sys.argv[1])
seconds = time.perf_counter() - t
after = proc.memory_info().rss
print(json.dumps({"seconds": seconds, "rss_mib": after / 2**20, "added_mib": (after - before) / 2**20,
                  "passages": len(index)}))
"""


def demo(precisions: list[str], workdir: str | None) -> None:
    from benchmarks.common import run_module

    work = Path(workdir or tempfile.mkdtemp(prefix="bench-build-demo-"))
    rows = []
    for p in precisions:
        out = work / f"demo-{p}"
        seconds, peak, _ = run_module("index_builder", ["build", "--quiet", "--overwrite", "--config",
                                                        "configs/index/demo.yaml", "--set", f"output={out}",
                                                        "--set", f"encoder.precision={p}"])
        m = json.loads((out / "manifest.json").read_text())
        rows.append({"precision": p, "build s": seconds, "passages/s": m["count"] / seconds,
                     "encode s": m["build"]["seconds"].get("vectors"), "peak MiB": peak})
    for r in rows:
        r["vs first"] = rows[0]["build s"] / r["build s"]
    print(f"machine: {machine()}; demo index ({rows[0]['passages/s'] * rows[0]['build s']:.0f} passages)")
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=200_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--demo", action="store_true", help="build the demo index once per precision instead")
    ap.add_argument("--precisions", default="float32,bfloat16")
    args = ap.parse_args()
    if args.demo:
        return demo(args.precisions.split(","), args.workdir)
    sys.path.insert(0, str(REPO))
    from tests.conftest import WORDS, write_tiny_bert

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-build-"))
    work.mkdir(parents=True, exist_ok=True)
    model = write_tiny_bert(work / "tiny-bert", hidden=32, layers=2)
    corpus = work / "corpus.jsonl"
    rng = random.Random(0)
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(args.passages):
            f.write(json.dumps({"id": f"d{i}", "title": f"doc {i}",
                                "text": " ".join(rng.choice(WORDS) for _ in range(100))}) + "\n")
    out = work / "index"
    cmd = [sys.executable, "-m", "index_builder", "build", "--quiet", "--overwrite", "--set", f"output={out}",
           "--set", f"corpus.path={corpus}", "--set", f"encoder.name={model}", "--set", "encoder.max_length=128",
           "--set", "index.type=flat"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    build_s = time.perf_counter() - t
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    opened = json.loads(subprocess.run([sys.executable, "-c", OPEN, str(out)], check=True, cwd=REPO,
                                       capture_output=True, text=True).stdout)
    folder_mib = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"machine: {machine()}; corpus {corpus.stat().st_size / 2**20:.0f} MiB, index folder {folder_mib:.0f} MiB")
    print(table([
        {"step": f"build {opened['passages']} passages (peak RSS)", "seconds": build_s, "MiB": peak_mib,
         "limit": "< 2048 MiB"},
        {"step": "DenseIndex.load (RSS after opening)", "seconds": opened["seconds"], "MiB": opened["rss_mib"],
         "limit": "< 1 s"},
        {"step": "DenseIndex.load (RSS added by opening)", "seconds": opened["seconds"], "MiB": opened["added_mib"],
         "limit": "< 100 MiB"},
    ]))


if __name__ == "__main__":
    main()
