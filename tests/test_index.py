import json

import faiss
import numpy as np
import pytest

from rag.config import IndexConfig
from rag.retrieval.index import DenseIndex, augment, build_faiss, set_search_params
from rag.retrieval.index_folder import MANIFEST, IndexFolderError


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """Points of one Gaussian mixture (the same centres for every seed): documents and queries alike."""
    centres = np.random.default_rng(1234).normal(size=(clusters, dim)).astype(np.float32) * 3
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth, strict=True)]))


@pytest.mark.parametrize(
    "cfg, floor",
    [
        (IndexConfig(type="flat"), 1.0),
        (IndexConfig(type="hnsw", hnsw_m=16, ef_construction=64, ef_search=64), 0.9),
        (IndexConfig(type="ivfpq", nlist=16, pq_m=8, nprobe=8), 0.3),
        (IndexConfig(type="ivfpq", nlist=16, pq_m=8, nprobe=8, opq=True), 0.3),
    ],
)
def test_each_type_against_brute_force(cfg, floor):
    x, q = clustered(3000, 32), clustered(50, 32, seed=1)
    index, extra = build_faiss(x, cfg, progress=False)
    set_search_params(index, cfg)
    _, ids = index.search(augment(q, 0.0) if extra["mips_norm2"] is not None else q, 10)
    assert recall(ids, brute_force(x, q, 10)) >= floor


def test_flat_scores_are_inner_products():
    x, q = clustered(500, 16), clustered(5, 16, seed=2)
    index, _ = build_faiss(x, IndexConfig(type="flat"), progress=False)
    scores, ids = index.search(q, 5)
    np.testing.assert_array_equal(ids, brute_force(x, q, 5))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, 1), rtol=1e-5)


def test_ivfpq_needs_enough_vectors_and_a_divisor():
    with pytest.raises(ValueError, match="nlist"):
        build_faiss(clustered(10, 16), IndexConfig(type="ivfpq", nlist=32, pq_m=4), progress=False)
    with pytest.raises(ValueError, match="pq_m"):
        build_faiss(clustered(100, 16), IndexConfig(type="ivfpq", nlist=4, pq_m=5), progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_bert):
    """A flat and an ivfpq index over the same generated corpus, built with the tiny encoder."""
    from index_builder.build import build
    from rag.config import BuildConfig, load_config
    from tests.conftest import long_docs, write_jsonl

    root = tmp_path_factory.mktemp("built")
    corpus = write_jsonl(root / "corpus.jsonl", long_docs(120))
    out = {}
    for kind, extra in [("flat", []), ("hnsw", ["index.hnsw_m=8"]), ("ivfpq", ["index.nlist=8", "index.pq_m=8", "index.nprobe=8", "index.rerank=40"])]:
        cfg = load_config(BuildConfig, None, [
            f"output={root / kind}", f"corpus.path={corpus}", f"encoder.name={tiny_bert}", "passages.words=40",
            "passages.stride=30", f"index.type={kind}", *extra,
        ])
        out[kind] = build(cfg, progress=False)
    return out


def test_search_returns_ids_scores_vectors_and_passages(built):
    index = DenseIndex.load(built["flat"])
    q = np.asarray(index.vectors[:3], dtype=np.float32)
    res = index.search(q, 4, return_vectors=True)
    assert res.ids.shape == (3, 4) and res.vectors.shape == (3, 4, index.dim)
    self_scores = np.einsum("qd,qd->q", q, q)
    assert np.all(res.scores[:, 0] >= self_scores - 1e-5)  # nothing beats a stored vector's own score by more
    np.testing.assert_allclose(res.scores, np.einsum("qkd,qd->qk", res.vectors, q), rtol=1e-5, atol=1e-6)
    p = index.passages(res.ids[0])
    assert p[0].id == f"doc0#{res.ids[0, 0]}" and p[0].doc_id == "doc0" and p[0].title == "doc 0" and p[0].text
    assert index.passages([-1, 0])[0] is None


def test_k_larger_than_index_is_clamped(built):
    index = DenseIndex.load(built["flat"])
    res = index.search(np.asarray(index.vectors[:1], dtype=np.float32), 10**6)
    assert res.ids.shape == (1, len(index))


def test_ivfpq_rerank_recovers_flat(built):
    flat, approx = DenseIndex.load(built["flat"]), DenseIndex.load(built["ivfpq"])
    rng = np.random.default_rng(0)
    q = rng.normal(size=(20, flat.dim)).astype(np.float32)
    exact = flat.search(q, 5)
    got = approx.search(q, 5)
    assert recall(got.ids, exact.ids) >= 0.9
    no_rerank = DenseIndex.load(built["ivfpq"], rerank=0).search(q, 5)
    assert recall(got.ids, exact.ids) >= recall(no_rerank.ids, exact.ids)
    # re-ranked scores are exact inner products with the stored vectors
    np.testing.assert_allclose(got.scores, np.einsum("qkd,qd->qk", approx.gather(got.ids), q), rtol=1e-5, atol=1e-6)


def test_hnsw_scores_are_inner_products(built):
    flat, hnsw = DenseIndex.load(built["flat"]), DenseIndex.load(built["hnsw"])
    q = np.random.default_rng(1).normal(size=(20, flat.dim)).astype(np.float32) * 3
    got, exact = hnsw.search(q, 5), flat.search(q, 5)
    assert recall(got.ids, exact.ids) >= 0.9
    np.testing.assert_allclose(got.scores, np.einsum("qkd,qd->qk", hnsw.gather(got.ids), q), rtol=1e-4, atol=1e-4)


def test_manifest_records_the_build(built):
    m = json.loads((built["flat"] / MANIFEST).read_text())
    assert m["count"] == len(DenseIndex.load(built["flat"]))
    assert m["encoder"]["pooling"] == "mean" and len(m["encoder"]["fingerprint"]) == 16
    assert m["build"]["documents_read"] == 120 and m["build"]["passages_written"] == m["count"]
    assert set(m["files"]) == {"passages.arrow", "vectors.npy", "index.faiss"}
    assert all(len(e["sha256"]) == 64 for e in m["files"].values())
    assert (built["flat"] / "config.yaml").is_file()


def test_load_checks(built, tmp_path):
    import shutil

    with pytest.raises(IndexFolderError, match="does not exist.*index_builder build"):
        DenseIndex.load(tmp_path / "nope")
    with pytest.raises(IndexFolderError, match="no manifest.json"):
        DenseIndex.load(tmp_path)
    from rag.retrieval.index_folder import EncoderMismatch, IndexFolder

    folder = IndexFolder(built["flat"])
    manifest = folder.read_manifest()
    with pytest.raises(EncoderMismatch, match="encoder mismatch.*pooling: index has 'mean', encoder has 'cls'"):
        folder.check_encoder(manifest, {"pooling": "cls", "normalize": True, "dim": manifest["dim"]})
    with pytest.raises(EncoderMismatch, match="dim: index has 32, encoder has 16"):
        folder.check_encoder(manifest, {"pooling": "mean", "dim": 16})
    with pytest.raises(EncoderMismatch, match="fingerprint"):
        folder.check_encoder(manifest, {"fingerprint": "0" * 16}, same_weights=True)
    folder.check_encoder(manifest, {"fingerprint": "0" * 16, "pooling": "mean"})  # a query encoder: other weights
    broken = tmp_path / "broken"
    shutil.copytree(built["flat"], broken)
    m = json.loads((broken / MANIFEST).read_text())
    m["count"] += 1
    (broken / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(IndexFolderError, match=r"vectors.npy: shape"):
        DenseIndex.load(broken)
    m["count"] -= 1
    (broken / MANIFEST).write_text(json.dumps(m))
    flat = faiss.read_index(str(broken / "index.faiss"))
    row = (broken / "index.faiss").stat().st_size - (flat.ntotal - 1) * flat.d * 4  # vector 1 (not probed at load)
    with open(broken / "index.faiss", "r+b") as f:  # same size, different bytes
        f.seek(row)
        f.write(b"\x00\x01\x02")
    DenseIndex.load(broken)  # sizes match, probed vectors too: a plain load does not read whole files
    with pytest.raises(IndexFolderError, match="checksum"):
        DenseIndex.load(broken, verify=True)
    (broken / "passages.arrow").unlink()
    with pytest.raises(IndexFolderError, match="passages.arrow is missing"):
        DenseIndex.load(broken)


def test_loaded_index_is_memory_mapped(built):
    index = DenseIndex.load(built["flat"])
    assert isinstance(index.vectors, np.memmap)
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)


@pytest.mark.parametrize("where, name", [("files", "../victim.faiss"), ("files", "/etc/shadow"),
                                         ("segments", "../../important.arrow"), ("index_file", "sub/index.faiss")])
def test_a_crafted_manifest_cannot_reach_outside_its_folder(built, tmp_path, where, name):
    """Every name in a manifest must be a plain file of the folder: load, verify, update and compact refuse."""
    import shutil

    from index_builder.update import compact, update

    folder = tmp_path / "crafted"
    shutil.copytree(built["flat"], folder)
    victim = tmp_path / "victim.faiss"
    victim.write_bytes(b"precious")
    m = json.loads((folder / MANIFEST).read_text())
    if where == "files":
        m["files"][name] = {"bytes": 8, "sha256": "0" * 64}
    elif where == "segments":
        m["segments"] = [{"store": name, "vectors": "vectors.npy", "rows": m["count"]}]
    else:
        m[where] = name
    (folder / MANIFEST).write_text(json.dumps(m))
    (tmp_path / "gone.txt").write_text("paris\n")
    for attempt in (lambda: DenseIndex.load(folder, verify=True), lambda: compact(folder, progress=False),
                    lambda: update(folder, delete=str(tmp_path / "gone.txt"), progress=False)):
        with pytest.raises(IndexFolderError, match=f"entry '{name}' is not a plain file name"):
            attempt()
    assert victim.read_bytes() == b"precious"
