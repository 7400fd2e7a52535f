"""Why the 21M benchmark ranks worse than its density says: a set at its density, indexed with what it learnt itself
or with what the whole mixture teaches.

    python -m benchmarks.bench_density [--train own 200000 1000000] [--per 21015] [--clusters 10] [--set index.opq=true]

The set is `clusters` of bench_scale's 1,000 mixture clusters with `per` passages each (21,015: the 21M run's
density), 200 queries from the same clusters. Each `--train` entry builds the 21M config's IVF-PQ
(configs/index/wiki-dpr-import.yaml: HNSW coarse quantiser, its pq_m and nbits) and adds the set to it: `own` trains
on 100,000 of the set's own vectors with nlist scaled to 16 cells a cluster (as 16,384 / 1,000); a number N trains on
N vectors of the whole 1,000-cluster mixture with the config's nlist, as the 21M import does (built with faiss
from the config's factory string; k-means of 16,384 centroids on 1M vectors takes about half an hour on 2 cores).
Searched through `DenseIndex.search` at the config's nprobe, the candidates re-ranked exactly from the vectors;
recall@10 and @100 against exact search, by re-rank depth. docs/results.md's density figures were taken before the
config shipped OPQ at nprobe 32: add `--set index.opq=false --set index.nprobe=128` to reproduce them.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import faiss
import numpy as np

from benchmarks.bench_index import mixture
from benchmarks.common import machine, recall_at, table
from rag.config import BuildConfig, load_config, resolve_config_path
from rag.index_kinds import kind_of
from rag.retrieval.index import DenseIndex

DIM, QUERIES, RERANKS = 768, 200, (256, 1024, 2048, 4096)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", nargs="+", default=["own", "200000"],
                    help="'own', or a number of whole-mixture vectors to train on (default: own 200000)")
    ap.add_argument("--per", type=int, default=21_015, help="passages a cluster (the 21M run's density)")
    ap.add_argument("--clusters", type=int, default=10, help="clusters in the set")
    ap.add_argument("--config", default="configs/index/wiki-dpr-import.yaml", help="whose index settings to use")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of that config (e.g. index.opq=true, index.pq_m=64)")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(2)
    cfg = load_config(BuildConfig, resolve_config_path(args.config), tuple(args.set)).index
    x = mixture(args.clusters * args.per, DIM, seed=1, clusters=args.clusters).astype(np.float16).astype(np.float32)
    q = mixture(QUERIES, DIM, seed=7, clusters=args.clusters)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :100]
    print(f"# bench_density: {machine()}; {time.strftime('%Y-%m-%d')}; {len(x)} passages in {args.clusters} "
          f"clusters; {cfg.type} pq_m {cfg.pq_m}, nprobe {cfg.nprobe}")
    rows = []
    for entry in args.train:
        own = entry == "own"
        nlist = 16 * args.clusters if own else cfg.nlist
        sample = x[np.random.default_rng(0).choice(len(x), min(len(x), 100_000), replace=False)] if own else \
            mixture(int(entry), DIM, seed=99).astype(np.float16).astype(np.float32)
        kind = kind_of(cfg)
        factory = kind.factory(dataclasses.replace(cfg, nlist=nlist))
        index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        index.train(sample)
        seconds = time.perf_counter() - t
        kind.configure_add(index, cfg)
        index.add(x)
        kind.set_search(index, cfg)
        row = {"index": factory, "trained on": f"{f'own {len(sample)}' if own else entry + ' of the mixture'}",
               "train_s": round(seconds)}
        for r in RERANKS:  # the project's own search: approximate candidates, exact re-rank from the vectors
            ids = DenseIndex(".", {}, index, x, None, dataclasses.replace(cfg, rerank=r)).search(q, 100).ids
            row[f"re-rank {r}: @10 / @100"] = f"{recall_at(ids, truth, 10):.3f} / {recall_at(ids, truth, 100):.3f}"
        rows.append(row)
        del sample, index
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
