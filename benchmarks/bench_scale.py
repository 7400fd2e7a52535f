"""The paper's scale on this machine: DPR's 21,015,300 passages x 768 imported, indexed and searched.

    python -m benchmarks.bench_scale [--n 21015300] [--workdir DIR] [--keep]

Needs free disk for the generated source and the index folder side by side: about 3.3 kB a passage (68 GB at
21M; the source's float16 vectors 1.5 kB, the index's 1.5 kB, the rest passages and IVF-PQ codes). It checks the
disk first and runs at --n where it fits, else at the largest whole million that does (and says so). Steps, each
timed, memory measured in a fresh process:

1. a synthetic corpus in the format a user imports (`corpus.format: npy`): passages.jsonl (id, a short title and
   text) and vectors/NNNNN.npy float16 shards of 768-d vectors from bench_index's clustered mixture with a low
   intrinsic dimension (kept between runs: whole shards are not generated again);
2. `python -m index_builder import --config configs/index/wiki-dpr-import.yaml` over it (peak resident memory is
   the process's VmHWM: the vectors pass through file reads and writes, not a map, so it excludes the page cache);
3. `python -m index_builder verify` (sha256 of every file);
4. the exact top-100 of 200 queries, computed here over the stored vectors in blocks;
5. a searching process: load time, private memory (RssAnon) beside the shared page cache (RssFile), recall@10 and
   @100 against exact search and batched q/s at k = 10 and 100, for each nprobe / re-rank setting; then a second
   searching process beside the first, and the private memory it adds;
6. `RagPipeline.load` over the folder with a DPR-shaped BERT_q (random BERT-base weights, 768-d) and a tiny
   generator: cold load, the first answer and the warm latency of `retrieve`.

`--settings` names the nprobe:rerank pairs step 5 searches; `--search-only` repeats steps 4-6 over a kept --workdir
(the exact top-100 is kept too), for another grid without another import.

The generated source and the index are removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, recall_at, run_module, table

PAPER_N = 21_015_300
DIM = 768
SHARD = 500_000
CONFIG = "configs/index/wiki-dpr-import.yaml"
HEADROOM = 6 * 2**30  # index checkpoints (two IVF-PQ files at once) and temporaries
SETTINGS = "16:768,32:512,32:640,32:768,128:1024"  # nprobe:rerank searched (the OPQ run's neighbourhood)


def row_bytes(pq_m: int) -> int:
    """Disk a passage takes: source + index float16 vectors, its PQ code, list id, passage text (twice)."""
    return 2 * DIM * 2 + pq_m + 8 + 160


def rows_that_fit(free: int, wanted: int, pq_m: int) -> int:
    """--n where the disk holds it, else the largest whole million that fits."""
    fit = (free - HEADROOM) // row_bytes(pq_m)
    return wanted if fit >= wanted else int(fit // 1_000_000 * 1_000_000)


def generate(src: Path, n: int) -> None:
    """passages.jsonl and float16 vector shards (two processes: the normal draws dominate); a shard already whole
    on disk is kept."""
    from concurrent.futures import ProcessPoolExecutor

    (src / "vectors").mkdir(parents=True, exist_ok=True)
    todo = [(src / "vectors" / f"{i:05d}.npy", i, min(SHARD, n - start))
            for i, start in enumerate(range(0, n, SHARD))]
    todo = [t for t in todo if not (t[0].is_file() and np.load(t[0], mmap_mode="r").shape == (t[2], DIM))]
    with ProcessPoolExecutor(2) as pool:
        for done, _ in enumerate(pool.map(_shard, todo), 1):
            print(f"  vector shards {done}/{len(todo)}", file=sys.stderr, flush=True)
    passages = src / "passages.jsonl"
    if not passages.is_file() or _lines(passages) != n:
        with open(passages, "w", encoding="utf-8") as f:
            for s in range(0, n, 100_000):
                f.write("".join(f'{{"id":"{i}","title":"Passage {i}","text":"Synthetic passage {i} of the '
                                f'scale benchmark."}}\n' for i in range(s, min(n, s + 100_000))))


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _shard(job: tuple[Path, int, int]) -> None:
    from benchmarks.bench_index import mixture
    from rag.files import save_npy

    path, i, rows = job
    save_npy(path, mixture(rows, DIM, seed=1000 + i).astype(np.float16))


def exact_top(vectors: Path, queries: np.ndarray, k: int = 100, block: int = 500_000) -> np.ndarray:
    """The exact top-k row ids of each query over the stored vectors, read in blocks."""
    from rag.files import NpyRows

    rows = NpyRows(vectors)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for s in range(0, len(rows), block):
        scores = queries @ np.asarray(rows[s : s + block], np.float32).T  # (Q, block)
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_s = np.hstack([best_s, np.take_along_axis(scores, top, 1)])
        best_i = np.hstack([best_i, top + s])
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def memory() -> dict:
    fields = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # MiB
    return fields


def parse_settings(text: str) -> list[tuple[int, int]]:
    """"128:256,128:1024" -> [(128, 256), (128, 1024)]: the nprobe / re-rank pairs searched."""
    try:
        return [(int(a), int(b)) for a, b in (pair.split(":") for pair in text.split(","))]
    except ValueError:
        wanted = f"--settings wants nprobe:rerank pairs separated by commas, like {SETTINGS}"
        raise SystemExit(f"{wanted}; got {text!r}") from None


def search_worker(folder: Path, work: Path, hold: bool, settings: str) -> None:
    """Load the folder, search every setting, print one JSON line; with `hold`, stay loaded until stdin closes."""
    from rag.retrieval.index import DenseIndex

    queries, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    t = time.perf_counter()
    index = DenseIndex.load(folder)
    out = {"load_s": time.perf_counter() - t, "after_load": memory(), "settings": []}
    for nprobe, rerank in parse_settings(settings):
        index = DenseIndex.load(folder, nprobe=nprobe, rerank=rerank)
        row = {"nprobe": nprobe, "rerank": rerank}
        for k in (10, 100):
            for s in range(0, len(queries), 50):  # a warm-up pass: page in what these queries touch
                index.search(queries[s : s + 50], k)
            t = time.perf_counter()
            ids = np.concatenate([index.search(queries[s : s + 50], k).ids for s in range(0, len(queries), 50)])
            row[f"qps@{k}"] = len(queries) / (time.perf_counter() - t)
            row[f"recall@{k}"] = recall_at(ids, truth, k)
        out["settings"].append(row)
    out["after_search"] = memory()
    print(json.dumps(out), flush=True)
    if hold:
        sys.stdin.read()


def e2e_worker(folder: Path, work: Path) -> None:
    """RagPipeline over the folder: a random BERT-base BERT_q (768-d, CLS, as DPR's) and a tiny generator."""
    from rag.pipeline import RagPipeline
    from rag.resolve import load_rag_config

    yaml = work / "rag.yaml"
    yaml.write_text(f"index: {folder}\nn_docs: 5\nquery_encoder: {{name: {work / 'bert-base'}, pooling: cls, "
                    f"normalize: false, title: pair}}\ngenerator: {{name: {work / 'tiny-lm'}}}\n", encoding="utf-8")
    cfg = load_rag_config(yaml)
    t = time.perf_counter()
    pipe = RagPipeline.load(cfg)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    answer = pipe.answer("Who wrote the synthetic passage?")
    first_s = time.perf_counter() - t
    times = []
    for i in range(20):
        t = time.perf_counter()
        pipe.retrieve(f"what is passage number {i}?")
        times.append(time.perf_counter() - t)
    print(json.dumps({"load_s": load_s, "first_answer_s": first_s, "retrieve_ms": 1000 * float(np.median(times)),
                      "passages": len(answer.passages), "memory": memory()}), flush=True)


def write_models(work: Path) -> None:
    """The benchmark's BERT_q (BERT-base shape, random weights) and generator (tiny, random), built here."""
    import torch
    from transformers import BertConfig, BertModel

    from tests.conftest import wordpiece_tokenizer, write_tiny_lm

    if not (work / "bert-base" / "config.json").is_file():
        tok, vocab = wordpiece_tokenizer(work / "bert-base")
        tok.save_pretrained(work / "bert-base")
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=len(vocab))).eval().save_pretrained(work / "bert-base")
    if not (work / "tiny-lm" / "config.json").is_file():
        write_tiny_lm(work / "tiny-lm", "llama")


def worker(args: list[str], hold: bool = False):
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", *args]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE if hold else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            text=True)


def build(args: argparse.Namespace, work: Path, src: Path, folder: Path) -> dict:
    """Steps 1-3: check the disk, generate the source, import it and verify the folder; their figures."""
    from rag.config import BuildConfig, load_config

    have = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
    free = shutil.disk_usage(work).free + have
    pq_m = load_config(BuildConfig, args.config, args.set).index.pq_m
    n = rows_that_fit(free, args.n, pq_m)
    print(f"# bench_scale: {machine()}; {time.strftime('%Y-%m-%d')}\n# disk at {work}: {free / 1e9:.1f} GB free for "
          f"this run, {row_bytes(pq_m) * args.n / 1e9 + HEADROOM / 1e9:.1f} GB needed for {args.n:,} passages")
    if n < args.n:
        print(f"# the disk holds {n:,} passages, not {args.n:,}: running at {n:,} (times scale about linearly)")
    if n < min(args.n, 1_000_000):
        raise SystemExit("not enough free disk for a million passages; free some or give --workdir elsewhere")
    figures = {"passages": n}
    t = time.perf_counter()
    generate(src, n)
    figures["generate_s"] = time.perf_counter() - t
    sets = [f"output={folder}", "corpus.format=npy", f"corpus.path={src / 'passages.jsonl'}",
            f"corpus.vectors={src / 'vectors'}", *args.set]
    seconds, peak, _ = run_module("index_builder", ["import", "--config", args.config, "--quiet",
                                                     *[x for s in sets for x in ("--set", s)]])
    figures.update(import_s=seconds, import_peak_mib=peak)
    built = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["build"]
    figures.update({f"  {k}_s": v for k, v in built["seconds"].items()},
                   **{"  of which training_s": built.get("index_training_seconds")})
    seconds, peak, _ = run_module("index_builder", ["verify", str(folder)])
    figures.update(verify_s=seconds, verify_peak_mib=peak)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=PAPER_N, help="passages (default: DPR's 21,015,300)")
    ap.add_argument("--workdir", default="bench-scale", help="where the source and the index go (default: %(default)s)")
    ap.add_argument("--config", default=CONFIG, help="the import config (default: %(default)s)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an import config key")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the generated source and the index")
    ap.add_argument("--settings", default=SETTINGS, help="nprobe:rerank pairs searched (default: %(default)s)")
    ap.add_argument("--search-only", action="store_true",
                    help="search a kept --workdir again (steps 4-6) without generating or importing")
    ap.add_argument("--search-worker", nargs=2, metavar=("FOLDER", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--e2e-worker", nargs=2, metavar=("FOLDER", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.search_worker:
        return search_worker(Path(args.search_worker[0]), Path(args.search_worker[1]), args.hold, args.settings)
    if args.e2e_worker:
        return e2e_worker(Path(args.e2e_worker[0]), Path(args.e2e_worker[1]))

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src, folder = work / "source", work / "index"
    figures = {} if args.search_only else build(args, work, src, folder)

    from benchmarks.bench_index import mixture

    if not (args.search_only and (work / "truth.npy").is_file()):  # the same queries: the truth kept is theirs
        queries = mixture(args.queries, DIM, seed=7)
        np.save(work / "queries.npy", queries)
        t = time.perf_counter()
        np.save(work / "truth.npy", exact_top(folder / "vectors.npy", queries))
        figures["exact_s"] = time.perf_counter() - t

    searching = ["--search-worker", str(folder), str(work), "--settings", args.settings]
    first = worker([*searching, "--hold"], hold=True)
    one = json.loads(first.stdout.readline())
    second = worker(searching)
    two = json.loads(second.communicate()[0])
    first.communicate("")
    write_models(work)
    e2e = worker(["--e2e-worker", str(folder), str(work)])
    end = json.loads(e2e.communicate()[0])
    report(figures, one, two, end)
    if not (args.keep or args.search_only):  # a search-only run leaves what it found as it was
        shutil.rmtree(work)


def report(figures: dict, one: dict, two: dict, end: dict) -> None:
    print(table([{"measure": k, "value": v} for k, v in {
        **figures, "load_s": one["load_s"],
        "private MiB (searching)": one["after_search"]["RssAnon"],
        "page cache MiB mapped (searching)": one["after_search"]["RssFile"],
        "private MiB of a second process": two["after_search"]["RssAnon"],
        "second process load_s": two["load_s"],
        "RagPipeline.load_s (cold)": end["load_s"], "first answer_s": end["first_answer_s"],
        "retrieve ms (warm, median of 20)": end["retrieve_ms"], "RagPipeline private MiB": end["memory"]["RssAnon"],
    }.items()]))
    print()
    print(table(one["settings"]))


if __name__ == "__main__":
    main()
