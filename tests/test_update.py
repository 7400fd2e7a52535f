import json
import multiprocessing
import time

import numpy as np
import pytest

from index_builder.__main__ import main as cli
from index_builder.build import build
from index_builder.update import UpdateError, compact, update
from rag.config import BuildConfig, load_config
from rag.retrieval.index import DenseIndex
from rag.retrieval.index_folder import EncoderMismatch, FolderBusy, IndexFolder, IndexFolderError
from tests.conftest import long_docs, write_jsonl

TYPES = {"flat": [], "hnsw": ["index.hnsw_m=16", "index.ef_search=200"],
         "ivfpq": ["index.nlist=4", "index.pq_m=8", "index.nprobe=4", "index.rerank=100"]}
TYPES["ivfpq-opq"] = [*TYPES["ivfpq"], "index.nbits=4", "index.opq=true"]  # a rotation before the codes


def make(tmp_path, tiny_bert, docs, name, kind="flat"):
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    cfg = load_config(BuildConfig, None, [f"output={tmp_path / name}", f"corpus.path={corpus}",
                                          f"encoder.name={tiny_bert}", "passages.words=30", "passages.stride=20",
                                          f"index.type={kind.split('-')[0]}", *TYPES[kind]])
    return build(cfg, progress=False)


def top_ids(index: DenseIndex, queries: np.ndarray, k: int = 5) -> list[list[str]]:
    res = index.search(queries, k)
    return [[p.id for p in index.passages(row)] for row in res.ids]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq", "ivfpq-opq"])
def test_add_replace_delete_equals_a_fresh_build(tmp_path, tiny_bert, kind):
    docs = long_docs(40)
    base = make(tmp_path, tiny_bert, docs[:30], "base", kind)
    new_docs, changed = docs[30:], {**docs[3], "text": docs[3]["text"][::-1]}
    write_jsonl(tmp_path / "add.jsonl", new_docs)
    write_jsonl(tmp_path / "replace.jsonl", [changed])
    (tmp_path / "delete.txt").write_text("doc5\ndoc7\n")
    report = update(base, add=str(tmp_path / "add.jsonl"), replace=str(tmp_path / "replace.jsonl"),
                    delete=str(tmp_path / "delete.txt"), progress=False)
    assert report.generation == 1 and report.deleted_docs == ["doc5", "doc7"] and report.replaced_docs == ["doc3"]
    final = [d for d in docs[:30] if d["id"] not in ("doc3", "doc5", "doc7")] + new_docs + [changed]
    fresh = DenseIndex.load(make(tmp_path, tiny_bert, final, "fresh", kind))
    updated = DenseIndex.load(base)
    assert len(updated) == len(fresh)
    q = np.random.default_rng(0).normal(size=(30, updated.dim)).astype(np.float32)
    got, want = top_ids(updated, q), top_ids(fresh, q)
    assert not any(i.startswith(("doc5#", "doc7#")) for row in got for i in row)
    if kind == "flat":
        assert got == want
    else:
        overlap = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, want, strict=True)])
        assert overlap >= 0.9
    # compaction drops the masked rows and keeps the results
    assert compact(base) == updated.manifest["deleted"]
    compacted = DenseIndex.load(base)
    assert compacted.generation == 2 and not len(compacted.deleted) and len(compacted) == len(fresh)
    if kind == "flat":
        assert top_ids(compacted, q) == want
    m = json.loads((base / "manifest.json").read_text())
    assert [h["generation"] for h in m["history"]] == [1, 2]
    assert sorted(p.name for p in base.iterdir() if p.name.startswith(("passages", "vectors", "index", "deleted")))\
        == sorted(m["files"])  # files of old generations are gone
    DenseIndex.load(base, verify=True)


def test_crash_before_the_switch_keeps_the_previous_generation(tmp_path, tiny_bert):
    base = make(tmp_path, tiny_bert, long_docs(10), "base")
    write_jsonl(tmp_path / "add.jsonl", long_docs(12)[10:])
    before = top_ids(DenseIndex.load(base), np.ones((2, 32), np.float32))

    def crash():
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        update(base, add=str(tmp_path / "add.jsonl"), progress=False, _before_switch=crash)
    index = DenseIndex.load(base, verify=True)
    assert index.generation == 0 and top_ids(index, np.ones((2, 32), np.float32)) == before
    update(base, add=str(tmp_path / "add.jsonl"), progress=False)  # rerun: completes
    assert DenseIndex.load(base, verify=True).generation == 1


def test_unknown_delete_warns_and_changes_nothing(tmp_path, tiny_bert, caplog):
    base = make(tmp_path, tiny_bert, long_docs(5), "base")
    (tmp_path / "delete.txt").write_text("nope\nalso-nope\n")
    report = update(base, delete=str(tmp_path / "delete.txt"), progress=False)
    assert report.unknown_deletes == ["nope", "also-nope"] and "nope, also-nope" in caplog.text
    assert DenseIndex.load(base).generation == 0


def test_bad_update_files(tmp_path, tiny_bert):
    base = make(tmp_path, tiny_bert, long_docs(5), "base")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(long_docs(7)[5]) + "\n{oops\n")
    with pytest.raises(Exception, match=rf"{bad}:2: malformed JSON"):
        update(base, add=str(bad), progress=False)
    report = update(base, add=str(bad), on_error="skip", progress=False)
    assert report.skipped_malformed == 1 and report.added_docs == ["doc5"]
    with pytest.raises(UpdateError, match="already in the index.*--replace"):
        update(base, add=str(bad), on_error="skip", progress=False)


def test_encoder_fingerprint_refusal(tmp_path, tiny_bert, other_bert):
    base = make(tmp_path, tiny_bert, long_docs(5), "base")
    write_jsonl(tmp_path / "add.jsonl", long_docs(6)[5:])
    with pytest.raises(EncoderMismatch, match=r"built with .*tiny-bert.*encoder is .*other-bert.*fingerprint"):
        update(base, add=str(tmp_path / "add.jsonl"), overrides=(f"encoder.name={other_bert}",), progress=False)
    with pytest.raises(EncoderMismatch, match="pooling: index has 'mean', encoder has 'cls'"):
        update(base, add=str(tmp_path / "add.jsonl"), overrides=("encoder.pooling=cls",), progress=False)


def _hold_lock(folder, ready):
    with IndexFolder(folder).lock():
        ready.set()
        time.sleep(3)


def test_concurrent_updates_are_refused(tmp_path, tiny_bert):
    base = make(tmp_path, tiny_bert, long_docs(5), "base")
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(base, ready))
    holder.start()
    ready.wait(10)
    (tmp_path / "delete.txt").write_text("doc1\n")
    with pytest.raises(FolderBusy, match="being updated by another process .*pid"):
        update(base, delete=str(tmp_path / "delete.txt"), progress=False)
    holder.join()
    update(base, delete=str(tmp_path / "delete.txt"), progress=False)  # the lock went with its process


def test_cli_update_compact_verify(tmp_path, tiny_bert, capsys):
    base = make(tmp_path, tiny_bert, long_docs(6), "base")
    write_jsonl(tmp_path / "add.jsonl", long_docs(8)[6:])
    (tmp_path / "delete.txt").write_text("doc0\nghost\n")
    assert cli(["update", "--index", str(base), "--add", str(tmp_path / "add.jsonl"), "--delete",
                str(tmp_path / "delete.txt"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "generation 1: +2 documents" in out and "1 deleted" in out and "ghost" in out
    assert cli(["compact", str(base)]) == 0 and cli(["verify", str(base)]) == 0
    assert cli(["update", "--index", str(base)]) == 2


def test_files_left_by_a_kill_after_the_switch_are_swept(tmp_path, tiny_bert, monkeypatch, caplog):
    """Killed between the manifest's rename and the unlinks, an update leaves the old generation's files; the next
    writer removes them (and half-written *.tmp files), never a file the manifest names or one not of the format."""
    import logging

    base = make(tmp_path, tiny_bert, long_docs(10), "base")
    write_jsonl(tmp_path / "add.jsonl", long_docs(12)[10:])
    monkeypatch.setattr(IndexFolder, "switch", lambda self, old, new: rag_write(self, new))  # rename, then killed
    update(base, add=str(tmp_path / "add.jsonl"), progress=False)
    monkeypatch.undo()
    assert (base / "index.faiss").is_file()  # generation 0's index, no longer named by the manifest
    (base / "vectors.g0002.npy.tmp").write_bytes(b"half")
    (base / "notes.txt").write_text("mine")
    (tmp_path / "gone.txt").write_text("doc0\n")
    with caplog.at_level(logging.INFO, logger="rag.retrieval.index_folder"):
        update(base, delete=str(tmp_path / "gone.txt"), progress=False)
    assert "index.faiss" in caplog.text and not (base / "index.faiss").exists()
    assert not (base / "vectors.g0002.npy.tmp").exists() and (base / "notes.txt").read_text() == "mine"
    DenseIndex.load(base, verify=True)


def rag_write(folder, manifest):
    from rag.retrieval.index_folder import write_json_atomic

    write_json_atomic(folder.manifest_path, manifest)


def test_duplicate_document_ids_are_refused(tmp_path, tiny_bert):
    """Two documents with one id (two passages "dup#0") are refused by a build and by an update, naming the id."""
    from index_builder.build import BuildError, build
    from rag.config import BuildConfig, load_config

    docs = long_docs(4)
    docs[3]["id"] = docs[1]["id"]
    corpus = write_jsonl(tmp_path / "dup.jsonl", docs)
    cfg = load_config(BuildConfig, None, [f"output={tmp_path / 'dup'}", f"corpus.path={corpus}",
                                          f"encoder.name={tiny_bert}", "passages.words=40", "passages.stride=30"])
    with pytest.raises(BuildError, match=r"duplicate document ids \(doc1\)"):
        build(cfg, progress=False)
    base = make(tmp_path, tiny_bert, long_docs(5), "base")
    twice = [long_docs(7)[5], long_docs(7)[5]]
    write_jsonl(tmp_path / "twice.jsonl", twice)
    with pytest.raises(UpdateError, match="given twice in this update: doc5"):
        update(base, add=str(tmp_path / "twice.jsonl"), progress=False)
    assert DenseIndex.load(base).generation == 0


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_an_emptied_index_stays_valid_answers_clearly_and_takes_new_documents(tmp_path, tiny_bert, tiny_lms, kind,
                                                                              capsys):
    """Deleting every document and compacting once left a folder that verify, rag ask and update --add crashed on."""
    from rag.cli import main as ask
    from rag.pipeline import RagPipeline
    from tests.conftest import rag_config, rag_yaml

    docs = long_docs(6)
    base = make(tmp_path, tiny_bert, docs, "base", kind)
    (tmp_path / "all.txt").write_text("".join(f"{d['id']}\n" for d in docs))
    update(base, delete=str(tmp_path / "all.txt"), progress=False)
    compact(base, progress=False)
    assert cli(["verify", str(base)]) == 0
    index = DenseIndex.load(base, verify=True)
    assert len(index) == 0 and index.search(np.ones((2, index.dim), np.float32), 3).ids.shape == (2, 0)
    pipe = RagPipeline.load(rag_config(base, tiny_bert, tiny_lms["llama"]))
    with pytest.raises(IndexFolderError, match="no passages to retrieve.*update --index"):
        pipe.answer("capital of france")
    cfg = rag_yaml(tmp_path / "rag.yaml", rag_config(base, tiny_bert, tiny_lms["llama"]))
    capsys.readouterr()
    assert ask(["ask", "capital", "--config", str(cfg)]) == 2
    assert "no passages to retrieve" in capsys.readouterr().err
    report = update(base, add=write_jsonl(tmp_path / "again.jsonl", docs[:2]), progress=False)
    assert report.added_passages > 0
    index = DenseIndex.load(base, verify=True)
    assert len(index) == report.added_passages
    assert top_ids(index, np.asarray(index.vectors[:1], np.float32), 1) == [[index.passages([0])[0].id]]
    assert pipe.reload_index() == index.generation and pipe.answer("capital of france").passages


def test_an_update_that_changes_nothing_reports_the_current_generation(tmp_path, tiny_bert):
    base = make(tmp_path, tiny_bert, long_docs(4), "base")
    (tmp_path / "unknown.txt").write_text("nope\n")
    report = update(base, delete=str(tmp_path / "unknown.txt"), progress=False)
    assert report.generation == 0 == IndexFolder(base).read_manifest()["generation"]


def test_a_delete_list_that_is_not_utf8_is_one_error(tmp_path, tiny_bert):
    base = make(tmp_path, tiny_bert, long_docs(3), "base")
    (tmp_path / "del.txt").write_bytes(b"doc1\n\xff\xfe\n")
    with pytest.raises(UpdateError, match="del.txt: invalid UTF-8 at byte offset 5"):
        update(base, delete=str(tmp_path / "del.txt"), progress=False)
