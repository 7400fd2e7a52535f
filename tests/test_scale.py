"""The pieces the 21M-passage run (benchmarks/bench_scale.py) rests on, at a size the suite can afford: vectors
read and written without a map, the index stage checkpointed and resumed after a kill in training or in adding
(equal to an uninterrupted build), the HNSW coarse quantiser, memory-mapped inverted lists, and rerank >= k."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from index_builder.build import FolderCheckpoints, identity
from rag.config import BuildConfig, ConfigError, IndexConfig, load_config
from rag.files import NpyRows, create_npy
from rag.index_kinds import check_rerank, kind_of
from rag.retrieval.index import DenseIndex, build_faiss
from tests.test_index import brute_force, clustered, recall

IVF = IndexConfig(type="ivfpq", nlist=16, pq_m=8, nprobe=8, train_size=500, coarse="hnsw")


def test_npy_rows_reads_and_writes_like_a_memory_map(tmp_path):
    x = clustered(100, 8)
    path = tmp_path / "v.npy"
    create_npy(path, "float16", x.shape)
    rows = NpyRows(path, writable=True)
    rows.write(0, x[:60])
    rows.write(60, x[60:])
    rows.sync()
    mapped = np.load(path, mmap_mode="r")
    assert np.array_equal(rows[10:20], mapped[10:20]) and np.array_equal(rows[[3, 50, 99]], mapped[[3, 50, 99]])
    assert np.array_equal(np.asarray(mapped), x.astype(np.float16)) and rows[5:5].shape == (0, 8)


class Killed(Exception):
    pass


def _stops_after(saved: FolderCheckpoints, event: str, times: int = 1) -> FolderCheckpoints:
    """`saved`, raising Killed right after its `event` ("trained" / "filled") has happened `times` times."""
    real, seen = getattr(saved, event), []

    def wrapped(*args):
        real(*args)
        seen.append(1)
        if len(seen) == times:
            raise Killed

    setattr(saved, event, wrapped)
    return saved


@pytest.mark.parametrize("event", ["trained", "filled"])
def test_a_killed_index_stage_resumes_to_the_same_index(tmp_path, event):
    x = clustered(3000, 32)
    whole, _ = build_faiss(x, IVF, progress=False)
    state = {"stages": {}}
    saved = _stops_after(FolderCheckpoints(tmp_path, state, every=1000), event, times=2 if event == "filled" else 1)
    with pytest.raises(Killed):
        kind_of(IVF).build(x, IVF, progress=False, chunk=500, saved=saved)
    assert state["progress"].get("filled_rows", 0) == (2000 if event == "filled" else 0)
    resumed, _ = kind_of(IVF).build(x, IVF, progress=False, chunk=500, saved=FolderCheckpoints(tmp_path, state, 1000))
    assert np.array_equal(faiss.serialize_index(resumed), faiss.serialize_index(whole))


def test_hnsw_coarse_quantiser_finds_what_the_flat_one_does():
    x, q = clustered(3000, 32), clustered(50, 32, seed=1)
    for coarse in ("flat", "hnsw"):
        cfg = IndexConfig(type="ivfpq", nlist=16, pq_m=8, nprobe=8, coarse=coarse)
        index, _ = build_faiss(x, cfg, progress=False)
        kind_of(cfg).set_search(index, cfg)
        assert ("HNSW" in kind_of(cfg).factory(cfg)) == (coarse == "hnsw")
        assert recall(index.search(q, 10)[1], brute_force(x, q, 10)) >= 0.3


def test_an_ivf_index_is_opened_with_its_lists_mapped(tmp_path):
    index, _ = build_faiss(clustered(3000, 32), IVF, progress=False)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    opened = faiss.read_index(str(tmp_path / "i.faiss"), kind_of(IVF).io_flags())
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(opened).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # shared page cache, no private copy of the codes
    q = clustered(5, 32, seed=3)
    kind_of(IVF).set_search(opened, IVF)
    kind_of(IVF).set_search(index, IVF)
    assert np.array_equal(opened.search(q, 5)[1], index.search(q, 5)[1])


def test_rerank_below_k_is_refused():
    cfg = IndexConfig(type="ivfpq", rerank=64)
    check_rerank(64, cfg)
    check_rerank(100, IndexConfig(type="ivfpq", rerank=0))  # no re-rank at all
    check_rerank(100, IndexConfig(type="flat", rerank=10))  # exact search re-ranks nothing
    with pytest.raises(ConfigError, match=r"index.rerank=64 is below n_docs=100.*>= 100"):
        check_rerank(100, cfg, what="n_docs")


def test_search_and_load_refuse_rerank_below_k(tmp_path, tiny_bert, tiny_lms, corpus_jsonl):
    import dataclasses

    from index_builder.build import build
    from rag.pipeline import RagPipeline
    from tests.conftest import build_cfg, rag_config

    folder = build(build_cfg(tmp_path, tiny_bert, corpus_jsonl, "index.type=ivfpq", "index.nlist=2",
                             "index.pq_m=4", "index.nbits=2", "index.rerank=4"), progress=False)
    index = DenseIndex.load(folder)
    assert index.search(np.zeros((1, index.dim), np.float32), 4).ids.shape == (1, 4)
    with pytest.raises(ConfigError, match="rerank=4 is below k=5"):
        index.search(np.zeros((1, index.dim), np.float32), 5)
    cfg = rag_config(folder, tiny_bert, tiny_lms["llama"])
    with pytest.raises(ConfigError, match="rerank=4 is below n_docs=5"):
        RagPipeline.load(dataclasses.replace(cfg, n_docs=5))
    assert RagPipeline.load(cfg).cfg.n_docs == 3


def test_an_older_folder_without_the_coarse_key_still_matches():
    cfg = load_config(BuildConfig, None, [])
    assert "coarse" not in identity(cfg)["index"]
    assert identity(load_config(BuildConfig, None, ["index.coarse=hnsw"]))["index"]["coarse"] == "hnsw"
