"""Index types side by side: recall@10 against exact search, queries per second, memory and file size.

    python benchmarks/bench_index.py [--n 500000] [--dim 768]

Vectors are a clustered Gaussian mixture with a low intrinsic dimension, like real passage embeddings: a cluster
centre, plus a point in a 64-dimensional subspace shared by all clusters, plus a little isotropic noise. Queries
come from the same mixture. Every index is searched through `DenseIndex.search` (HNSW's MIPS transform and
IVF-PQ's exact re-rank included), in batches of 64 queries.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.common import machine, matmul_gflops, recall_at, rss_mib, table
from rag.config import IndexConfig
from rag.retrieval.index import DenseIndex, build_faiss, set_search_params


def mixture(n: int, dim: int, seed: int, out: np.ndarray | None = None, chunk: int = 50_000,
            clusters: int = 1000) -> np.ndarray:
    """n points of the mixture (its 1,000 clusters fixed by one seed), drawn from its first `clusters` clusters."""
    model = np.random.default_rng(1234)
    centres = model.normal(size=(1000, dim)).astype(np.float32)
    basis = model.normal(size=(64, dim)).astype(np.float32) / 16
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32) if out is None else out
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        out[s : s + m] = (centres[rng.integers(0, clusters, m)] + rng.normal(size=(m, 64)).astype(np.float32)
                          @ basis + 0.05 * rng.normal(size=(m, dim)).astype(np.float32))
    return out


def timed_search(index: DenseIndex, queries: np.ndarray, k: int = 10, batch: int = 64) -> tuple[np.ndarray, float]:
    for s in range(0, len(queries), batch):  # warm-up pass: page in what these queries touch
        index.search(queries[s : s + batch], k)
    ids, t = [], time.perf_counter()
    for s in range(0, len(queries), batch):
        ids.append(index.search(queries[s : s + batch], k).ids)
    return np.concatenate(ids), len(queries) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--queries", type=int, default=640)
    ap.add_argument("--workdir", default=None, help="where to write the vectors and indexes (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    rate = matmul_gflops()

    vec_path = work / "vectors.npy"
    if not vec_path.exists() or np.load(vec_path, mmap_mode="r").shape != (args.n, args.dim):
        vectors = np.lib.format.open_memmap(vec_path, mode="w+", dtype=np.float32, shape=(args.n, args.dim))
        mixture(args.n, args.dim, seed=0, out=vectors)
        vectors.flush()
    vectors = np.load(vec_path, mmap_mode="r")
    queries = mixture(args.queries, args.dim, seed=1)

    configs = [
        ("flat", IndexConfig(type="flat")),
        ("hnsw", IndexConfig(type="hnsw", hnsw_m=32, ef_construction=80, ef_search=128)),
        ("hnsw", IndexConfig(type="hnsw", hnsw_m=32, ef_construction=80, ef_search=256)),
        ("ivfpq", IndexConfig(type="ivfpq", nlist=2048, pq_m=96, nbits=8, nprobe=64, rerank=200, train_size=60_000)),
        ("ivfpq", IndexConfig(type="ivfpq", nlist=2048, pq_m=96, nbits=8, nprobe=128, rerank=500, train_size=60_000)),
    ]
    rows, truth, flat_qps, flat_size = [], None, None, None
    for name, cfg in configs:
        path = work / f"{name}.faiss"
        t = time.perf_counter()
        if not path.exists():  # search-time settings share one built index
            index, extra = build_faiss(vectors, cfg, progress=True)
            faiss.write_index(index, str(path))
            del index
            (work / f"{name}.json").write_text(json.dumps({**extra, "build_s": time.perf_counter() - t}))
        meta = json.loads((work / f"{name}.json").read_text())
        gc.collect()
        before = rss_mib()
        raw = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        set_search_params(raw, cfg)
        index = DenseIndex(work, {}, raw, vectors, None, cfg, meta["mips_norm2"])
        ids, qps = timed_search(index, queries)
        mem = rss_mib() - before
        if name == "flat":
            truth, flat_qps, flat_size = ids, qps, path.stat().st_size
        del index, raw
        rec = recall_at(ids, truth, 10)
        rows.append({"index": f"{name} ({_params(cfg)})", "recall@10": rec, "queries/s": qps,
                     "x flat qps": qps / flat_qps, "file MiB": path.stat().st_size / 2**20,
                     "file / flat": path.stat().st_size / flat_size, "resident MiB": mem,
                     "build s": meta["build_s"]})
    print(f"machine: {machine()}; fp32 matmul {rate:.1f} GFLOP/s; {args.n} x {args.dim} vectors, "
          f"{args.queries} queries in batches of 64, k=10")
    print(table(rows))


def _params(cfg: IndexConfig) -> str:
    if cfg.type == "hnsw":
        return f"M={cfg.hnsw_m}, efC={cfg.ef_construction}, efS={cfg.ef_search}"
    if cfg.type == "ivfpq":
        return f"nlist={cfg.nlist}, PQ{cfg.pq_m}x{cfg.nbits}, nprobe={cfg.nprobe}, rerank={cfg.rerank}"
    return "exact"


if __name__ == "__main__":
    main()
