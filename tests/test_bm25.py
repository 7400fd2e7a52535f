"""BM25 beside the dense index, hybrid fusion, and index kinds as classes."""

import numpy as np
import pytest

from index_builder.build import build
from index_builder.update import compact, update
from rag.config import BuildConfig, ConfigError, IndexConfig, load_config
from rag.retrieval.fusion import fuse
from rag.retrieval.index import DenseIndex
from rag.retrieval.index_folder import IndexFolderError
from tests.conftest import DOCS, build_cfg, rag_config, write_jsonl

pytest.importorskip("bm25s")


def index_cfg(tmp_path, tiny_bert, *extra):
    return build_cfg(tmp_path, tiny_bert, write_jsonl(tmp_path / "corpus.jsonl", DOCS), *extra)


@pytest.fixture
def built(tmp_path, tiny_bert):
    return build(index_cfg(tmp_path, tiny_bert, "sparse.kind=bm25"), progress=False)


def ids_of(index, rows):
    return [[p.id if p else None for p in index.passages(r)] for r in rows]


def test_bm25_scores_equal_bm25s_own(built):
    import bm25s
    import Stemmer

    index = DenseIndex.load(built, verify=True)
    titles, texts = index.store.column("title"), index.store.column("text")
    stem = Stemmer.Stemmer("english")
    own = bm25s.BM25(k1=1.5, b=0.75)
    own.index(bm25s.tokenize([f"{t}. {x}" for t, x in zip(titles, texts, strict=True)], stopwords="en",
                             stemmer=stem, show_progress=False), show_progress=False)
    questions = ["capital of france", "mozart vienna composer", "the moon rocket apollo"]
    want_ids, want = own.retrieve(bm25s.tokenize(questions, stopwords="en", stemmer=stem, return_ids=False,
                                                 show_progress=False), k=3, show_progress=False)
    got_ids, got = index.bm25.search(questions, 3)
    hit = want > 0  # a passage sharing no term with the question scores 0 in bm25s: no hit here
    assert np.allclose(got[hit], want[hit], rtol=1e-5) and (got_ids[hit] == want_ids[hit]).all()
    assert (got_ids[~hit] == -1).all() and np.isneginf(got[~hit]).all()


def test_fusion_equals_a_brute_force_fusion():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, depth, k = 30, 8, 5
        dense_ids = np.stack([rng.choice(n, depth, replace=False) for _ in range(3)])
        sparse_ids = np.stack([rng.choice(n, depth, replace=False) for _ in range(3)])
        sparse_ids[0, 6:] = -1  # fewer BM25 hits
        dense_scores = -np.sort(-rng.normal(size=(3, depth)), 1).astype(np.float32)
        sparse_scores = np.where(sparse_ids >= 0, -np.sort(-rng.uniform(1, 9, (3, depth)), 1), -np.inf)
        for method in ("rrf", "sum"):
            got = fuse(dense_ids, dense_scores, sparse_ids, sparse_scores, k, method, 0.3, 60)
            for q in range(3):
                score = {}
                for ids, sc, w in ((dense_ids[q], dense_scores[q], 0.7), (sparse_ids[q], sparse_scores[q], 0.3)):
                    valid = [(i, s) for i, s in zip(ids, sc, strict=True) if i >= 0]
                    lo, hi = min(s for _, s in valid), max(s for _, s in valid)
                    for rank, (i, s) in enumerate(valid, 1):
                        part = 60 / (60 + rank) if method == "rrf" else w * ((s - lo) / (hi - lo))
                        score[int(i)] = score.get(int(i), 0.0) + part
                best = sorted(score.items(), key=lambda x: -x[1])[:k]
                assert np.allclose(got.scores[q], [s for _, s in best], atol=1e-6)
                assert set(got.ids[q]) == {i for i, _ in best} or len({s for _, s in best}) < k


def test_update_and_compact_keep_bm25_in_step(built, tmp_path):
    """An added passage is found by BM25 at once, a deleted one never; every generation's manifest lists its BM25
    files with their sha256."""
    add = write_jsonl(tmp_path / "add.jsonl", [{"id": "rome", "title": "Rome", "text": "Rome lies on the Tiber."}])
    (tmp_path / "del.txt").write_text("paris\n")
    update(built, add=str(add), delete=str(tmp_path / "del.txt"), progress=False)
    for step in ("update", "compact"):
        index = DenseIndex.load(built, verify=True)
        ids, _ = index.bm25.search(["tiber rome", "paris france capital"], 5)
        found = ids_of(index, ids)
        assert found[0][0] == "rome#0", step
        assert not any(i and i.startswith("paris#") for row in found for i in row), step
        assert all(name in index.manifest["files"] for name in index.manifest["sparse"]["files"].values())
        compact(built, progress=False)


def test_an_update_adds_the_bm25_part_and_a_missing_part_is_one_error(tmp_path, tiny_bert, tiny_lms):
    from rag.pipeline import RagPipeline

    out = build(index_cfg(tmp_path, tiny_bert), progress=False)
    with pytest.raises(IndexFolderError, match=r"needs a BM25 part.*--set sparse.kind=bm25"):
        RagPipeline.load(rag_config(out, tiny_bert, tiny_lms["llama"], retrieval="bm25"))
    update(out, overrides=("sparse.kind=bm25",), progress=False)
    pipe = RagPipeline.load(rag_config(out, tiny_bert, tiny_lms["llama"], retrieval="bm25"))
    assert pipe.retrieve("capital of france", 2)[0][0].title == "Paris"


def test_an_update_that_changes_a_bm25_setting_rebuilds_the_part_and_kind_none_drops_it(built):
    """A `--set sparse.*` on an update used to be ignored ("nothing to change") once the folder had a BM25 part."""
    update(built, overrides=("sparse.k1=0.9", "sparse.language=none"), progress=False)
    record = DenseIndex.load(built, verify=True).manifest["sparse"]
    assert (record["k1"], record["language"], record["files"]["data"]) == (0.9, "none", "bm25.g0001.data.npy")
    assert update(built, overrides=("sparse.k1=0.9",), progress=False).generation == 1  # the same: no generation
    update(built, overrides=("sparse.kind=none",), progress=False)
    index = DenseIndex.load(built, verify=True)
    assert index.manifest["sparse"] is None and index.bm25 is None


def test_an_update_keeps_the_built_bm25_settings_verbatim(tmp_path, tiny_bert):
    """The part's settings come from the manifest as values, not re-read as YAML text: Norwegian stopwords "no" would
    read back as False and stop every later update."""
    folder = build(index_cfg(tmp_path, tiny_bert, "sparse.kind=bm25", "sparse.stopwords='no'"), progress=False)
    update(folder, overrides=("sparse.k1=1.2",), progress=False)
    record = DenseIndex.load(folder, verify=True).manifest["sparse"]
    assert (record["stopwords"], record["k1"]) == ("no", 1.2)


def test_building_bm25_follows_the_programs_log_level(tmp_path, tiny_bert, caplog):
    """bm25s sets its logger to DEBUG when imported: a build printed "Building index from IDs objects" even under
    a program's quiet logging."""
    import logging

    caplog.set_level(logging.WARNING)  # the program's level, on the root logger
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("bm25s").addHandler(handler)
    try:
        build(index_cfg(tmp_path, tiny_bert, "sparse.kind=bm25"), progress=False)
    finally:
        logging.getLogger("bm25s").removeHandler(handler)
    assert [r.getMessage() for r in seen] == []


def test_an_unknown_stemmer_language_lists_the_known(tmp_path, tiny_bert):
    with pytest.raises(ConfigError, match="sparse.language: 'klingon' has no stemmer; known: arabic.*polish.*russian"):
        build(index_cfg(tmp_path, tiny_bert, "sparse.kind=bm25", "sparse.language=klingon"), progress=False)


@pytest.mark.parametrize("retrieval", ["bm25", "hybrid"])
def test_retrieval_modes_answer_and_say_which_side_found_each_passage(built, tiny_bert, tiny_lms, retrieval):
    from rag.config import FusionConfig
    from rag.pipeline import RagPipeline

    # a BM25-heavy fusion: the tiny random encoder's ranking differs between library versions
    pipe = RagPipeline.load(rag_config(built, tiny_bert, tiny_lms["llama"], retrieval=retrieval,
                                       fusion=FusionConfig(bm25_weight=0.9)))
    hits = pipe.retrieve("capital of france paris", 3)[0]
    assert [h.title for h in hits if h.bm25_rank == 1] == ["Paris"]  # BM25's first, whatever the tiny encoder says
    if retrieval == "bm25":
        assert hits[0].title == "Paris" and all(h.dense_rank is None for h in hits)
    else:
        assert all(h.dense_rank or h.bm25_rank for h in hits)
    ans = pipe.answer("capital of france paris")
    assert any(p.bm25_rank == 1 for p in ans.passages) and "bm25_rank" in ans.to_json()["passages"][0]
    if retrieval == "hybrid":  # the gradient still reaches BERT_q through the dense part

        loss = pipe.module.loss(["capital of france"], ["paris"], n_docs=3).sum()
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.parts()["query_encoder"].parameters())


def test_a_new_index_kind_is_one_class_and_one_registry_line(tmp_path, tiny_bert, monkeypatch):
    """The extension claim: a kind registered here (scalar-quantised codes, faiss "SQ8") builds, loads, updates
    and searches with no other change."""
    from rag import index_kinds

    class ScalarQuantised(index_kinds.IndexKind):
        name = "sq8"
        approximate = True
        lossy = True

        def factory(self, cfg: IndexConfig) -> str:
            return "SQ8"

    monkeypatch.setitem(index_kinds.KINDS, "sq8", ScalarQuantised())
    out = build(index_cfg(tmp_path, tiny_bert, "index.type=sq8", "index.rerank=20"), progress=False)
    add = write_jsonl(tmp_path / "add.jsonl", [{"id": "rome", "title": "Rome", "text": "Rome lies on the Tiber."}])
    update(out, add=str(add), progress=False)
    index = DenseIndex.load(out, verify=True)
    assert index.manifest["index"]["factory"] == "SQ8"
    q = np.asarray(index.vectors[:3], np.float32)
    exact = np.argsort(-np.asarray(index.vectors[:], np.float32) @ q.T, axis=0)[0]
    assert (index.search(q, 1).ids[:, 0] == exact).all()
    with pytest.raises(ConfigError, match="index.type: 'nope' is not an index kind; known: flat, hnsw, ivfpq, sq8"):
        build(load_config(BuildConfig, None, [f"output={tmp_path / 'other'}", f"corpus.path={tmp_path / 'corpus.jsonl'}",
                                              f"encoder.name={tiny_bert}", "index.type=nope"]), progress=False)


def test_first_use_adds_the_bm25_part_a_config_asks_for(tmp_path, tiny_bert, tiny_lms):
    """A managed index (the config names its build) built before BM25 existed gets its part on first use."""
    import dataclasses

    from rag.config import save_config
    from rag.first_use import load_pipeline

    cfg = index_cfg(tmp_path, tiny_bert)
    out = build(cfg, progress=False)
    save_config(cfg, tmp_path / "build.yaml")
    rag = dataclasses.replace(rag_config(out, tiny_bert, tiny_lms["llama"], retrieval="bm25"),
                              build=str(tmp_path / "build.yaml"))
    pipe = load_pipeline(rag)
    assert pipe.retrieve("capital of france", 1)[0][0].bm25_rank == 1
    assert DenseIndex.load(out, verify=True).manifest["sparse"]["kind"] == "bm25"


def test_fused_scores_in_dense_units_keep_the_dense_gaps():
    """A passage only the dense side found keeps its gap to the others: the prior is as sharp as over dense scores."""
    from rag.retrieval.fusion import in_dense_units

    dense_ids = np.array([[4, 7, 9, -1]])
    dense_scores = np.array([[0.62, 0.41, 0.30, -np.inf]], np.float32)
    none = np.full((1, 4), -1)
    fused = fuse(dense_ids, dense_scores, none, np.full((1, 4), -np.inf), 3, "sum", 0.2, 60)
    got = in_dense_units(fused, dense_scores, "sum", 0.2, 60, 4)[0]
    assert np.allclose(got - got[0], dense_scores[0, :3] - dense_scores[0, 0], atol=1e-6)


def test_a_reader_loading_in_a_loop_never_sees_parts_out_of_step(built, tmp_path):
    """While updates and a compaction switch generations, every load pairs one generation's BM25 with the same
    generation's passages: a BM25 hit is always a live passage of the store it was loaded with."""
    import threading

    stop, seen, errors = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                index = DenseIndex.load(built)
                ids, _ = index.bm25.search(["rome tiber", "capital of france"], 5)
                rows = ids[ids >= 0]
                assert len(rows) and not set(rows.tolist()) & set(index.deleted.tolist())
                assert all(p is not None for p in index.passages(rows))
                seen.add(index.generation)
            except IndexFolderError:
                pass  # a generation removed between the manifest read and the open: load retries, then says so
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(3):
            add = write_jsonl(tmp_path / f"add{i}.jsonl", [{"id": f"rome{i}", "title": "Rome",
                                                             "text": f"Rome lies on the Tiber, part {i}."}])
            (tmp_path / f"del{i}.txt").write_text(f"rome{i - 1}\n" if i else "paris\n")
            update(built, add=str(add), delete=str(tmp_path / f"del{i}.txt"), progress=False)
        compact(built, progress=False)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors[:3]
    assert len(seen) >= 2


def test_a_delete_only_update_keeps_the_bm25_files_and_masks_the_rows(built, tmp_path):
    before = DenseIndex.load(built).manifest["sparse"]["files"]
    (tmp_path / "del.txt").write_text("paris\n")
    update(built, delete=str(tmp_path / "del.txt"), progress=False)
    index = DenseIndex.load(built, verify=True)
    assert index.manifest["sparse"]["files"] == before  # no new rows: nothing to rebuild
    ids, _ = index.bm25.search(["paris france capital"], 5)
    assert not any(i and i.startswith("paris#") for i in ids_of(index, ids)[0])


@pytest.mark.parametrize("language, stopwords, docs, question", [
    ("russian", "ru", ["Лев Толстой написал роман «Война и мир».", "Москва — столица России.",
                       "Пётр Первый основал Санкт-Петербург."], "романы Толстого"),
    ("polish", "none", ["Henryk Sienkiewicz napisał powieść Quo vadis.", "Warszawa jest stolicą Polski.",
                        "Kopernik był astronomem z Torunia."], "powieści Sienkiewicza"),
    ("portuguese", "pt", ["O Brasil é o maior país da América do Sul.", "Lima é a capital do Peru.",
                          "Camões escreveu Os Lusíadas."], "os maiores países"),
])
def test_bm25_stems_russian_polish_and_portuguese(tmp_path, tiny_bert, language, stopwords, docs, question):
    """PyStemmer's Snowball stemmers: an inflected question finds the passage only through its stems."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": str(i), "title": "", "text": t}
                                                    for i, t in enumerate(docs)])
    folder = build(build_cfg(tmp_path, tiny_bert, corpus, "sparse.kind=bm25", f"sparse.language={language}",
                             f"sparse.stopwords={stopwords}"), progress=False)
    index = DenseIndex.load(folder)
    rows, scores = index.bm25.search([question], 1)
    assert index.passages(rows[0])[0].text == docs[0] and scores[0][0] > 0
    unstemmed = build(build_cfg(tmp_path / "plain", tiny_bert, corpus, "sparse.kind=bm25", "sparse.language=none",
                                f"sparse.stopwords={stopwords}"), progress=False)
    assert DenseIndex.load(unstemmed).bm25.search([question], 1)[1][0][0] <= 0  # no word in common unstemmed
