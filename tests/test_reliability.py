"""Failure behaviour, one test per class of fault (docs/failure-behaviour.md). Classes tested beside their module:

- a crafted manifest reaching outside its folder: test_index.py::test_a_crafted_manifest_cannot_reach_outside_its_folder
- nothing in a training checkpoint is unpickled, frozen parts are not saved:
  test_train.py::test_checkpoints_hold_no_pickle_and_no_frozen_part (+ test_a_damaged_checkpoint_is_one_line_...)
- a kill while writing a checkpoint: test_train.py::test_a_kill_while_writing_a_checkpoint_resumes_from_the_last_whole_one
- numeric settings out of range: test_config.py::test_out_of_range_settings_of_the_other_stages (and this file)
- an eval rerun on other data: test_eval.py::test_a_rerun_with_other_data_or_settings_is_refused
- duplicate document ids: test_build.py / test_update.py::test_duplicate_document_ids_are_refused
- files left by an update killed after its switch: test_update.py::test_files_left_by_a_kill_after_the_switch_are_swept
- a huge question: test_generator.py::test_a_huge_question_reaches_the_generator_bounded
"""

import importlib
import json

import faiss
import numpy as np
import pytest

from index_builder.build import BuildError, build
from rag.config import BuildConfig, load_config
from rag.retrieval.index import DenseIndex
from rag.retrieval.index_folder import IndexFolderError
from tests.conftest import DOCS, build_cfg, write_jsonl


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -- data loss ---------------------------------------------------------------------------------------------------


def test_overwrite_keeps_the_old_index_until_the_new_one_is_whole(tmp_path, tiny_bert):
    """--overwrite once deleted the old index first: a malformed corpus then left nothing."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = build(build_cfg(tmp_path, tiny_bert, corpus), progress=False)
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "title": "X", "text": "fine"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        build(build_cfg(tmp_path, tiny_bert, bad), overwrite=True, progress=False)
    assert snapshot(out) == before and DenseIndex.load(out).manifest["count"] > 0
    # the same overwrite with a good corpus replaces it, and leaves no staging folder behind
    more = write_jsonl(tmp_path / "more.jsonl", DOCS[:3])
    build(build_cfg(tmp_path, tiny_bert, more), overwrite=True, progress=False)
    replaced = DenseIndex.load(out)
    assert {i.split("#")[0] for i in replaced.store.column("id", 0, 100)} == {d["id"] for d in DOCS[:3]}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_overwrite_refuses_a_folder_that_is_not_an_index(tmp_path, tiny_bert):
    """--overwrite once deleted any folder it was pointed at (a thesis in a subfolder went with it)."""
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    (tmp_path / "index" / "thesis").mkdir(parents=True)
    (tmp_path / "index" / "thesis" / "chapter1.tex").write_text("months of work")
    with pytest.raises(BuildError, match="not an index build"):
        build(build_cfg(tmp_path, tiny_bert, corpus), overwrite=True, progress=False)
    assert (tmp_path / "index" / "thesis" / "chapter1.tex").read_text() == "months of work"


def test_a_resumed_build_refuses_an_edited_corpus(tmp_path, tiny_bert, monkeypatch):
    """Killed after its passage stage and rerun on an edited corpus, a build once kept the old passages."""
    b = importlib.import_module("index_builder.build")

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(b, "_encode_shards", killed)
    with pytest.raises(Killed):
        build(build_cfg(tmp_path, tiny_bert, corpus), progress=False)
    monkeypatch.undo()
    write_jsonl(corpus, DOCS[:-1] + [{**DOCS[-1], "text": "An edited passage about the ocean."}])
    with pytest.raises(BuildError, match="changed since the build"):
        build(build_cfg(tmp_path, tiny_bert, corpus), progress=False)
    build(build_cfg(tmp_path, tiny_bert, corpus), overwrite=True, progress=False)  # the way out the message names
    texts = DenseIndex.load(tmp_path / "index").store.column("text", 0, 100)
    assert any("edited passage" in t for t in texts)


# -- silent wrong results ----------------------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path, tiny_bert):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    return build(build_cfg(tmp_path, tiny_bert, corpus), progress=False)


def test_a_same_size_corruption_of_the_faiss_file_is_caught_at_load(built):
    """Flat codes overwritten in place (same size, so the manifest's size check passes) were once searched,
    top hit scored inf. Loading probes three stored vectors; `verify` (sha256) catches any changed byte."""
    path = built / "index.faiss"
    data = bytearray(path.read_bytes())
    index = faiss.read_index(str(path))
    codes = len(data) - index.ntotal * index.d * 4  # IndexFlat ends with its float32 codes
    data[codes:] = np.full(index.ntotal * index.d, np.inf, np.float32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFolderError, match="index.faiss"):
        DenseIndex.load(built)
    with pytest.raises(IndexFolderError, match="checksum"):
        DenseIndex.load(built, verify=True)


def test_a_damaged_faiss_header_is_one_error_naming_the_file(built):
    path = built / "index.faiss"
    data = bytearray(path.read_bytes())
    data[:8] = b"NOTFAISS"
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFolderError, match="index.faiss: cannot be read"):
        DenseIndex.load(built)


def test_non_finite_search_scores_are_an_error_not_a_ranking(built):
    index = DenseIndex.load(built)
    bad = faiss.IndexFlatIP(index.dim)
    bad.add(np.full((index.index.ntotal, index.dim), np.inf, np.float32))
    index.index = bad
    with pytest.raises(IndexFolderError, match="damaged"):
        index.search(np.ones((1, index.dim), np.float32), 3)


# -- concurrency -------------------------------------------------------------------------------------------------


def test_a_reader_opening_during_a_switch_opens_the_new_generation(built, tiny_bert, tmp_path, monkeypatch):
    """A reader that read the manifest just before `compact` switched and removed the old generation's files once
    failed ("could not open index.g0022.faiss"); it now re-reads the manifest and opens the new generation."""
    from index_builder.update import compact, update
    from rag.retrieval.index_folder import IndexFolder

    add = write_jsonl(tmp_path / "add.jsonl", [{"id": "rome", "title": "Rome", "text": "Rome is the capital of Italy."}])
    update(built, add=add, progress=False)
    real = IndexFolder.check_files
    calls = []

    def compact_in_between(self, manifest, verify=False):
        if not calls:  # the first open: another process compacts right now
            calls.append(1)
            compact(built, progress=False)
        return real(self, manifest, verify)

    monkeypatch.setattr(IndexFolder, "check_files", compact_in_between)
    index = DenseIndex.load(built)
    assert calls and index.generation == json.loads((built / "manifest.json").read_text())["generation"]
    assert "rome#0" in index.store.column("id", 0, len(index.store))


# -- user errors: one line, exit 2 -------------------------------------------------------------------------------


@pytest.fixture
def cli(capsys):
    def run(main, argv, *expected):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        for text in expected:
            assert text in err, err
        return err

    return run


@pytest.mark.parametrize("damage, name", [
    ("truncate", "passages.arrow"),
    ("header", "vectors.npy"),
])
def test_damaged_index_files_are_one_line(built, cli, tiny_bert, tiny_lms, tmp_path, damage, name):
    from rag.cli import main as ask
    from tests.conftest import rag_config, rag_yaml

    path = built / name
    data = path.read_bytes()
    manifest = json.loads((built / "manifest.json").read_text())
    # the same size as the manifest says: a damaged body, not a short file
    path.write_bytes(b"\0" * len(data) if damage == "truncate" else b"garbage!" + data[8:])
    assert manifest["files"][name]["bytes"] == path.stat().st_size
    cfg = rag_yaml(tmp_path / "rag.yaml", rag_config(built, tiny_bert, tiny_lms["llama"]))
    cli(ask, ["ask", "capital", "--config", str(cfg)], name)


def test_bad_paths_and_numbers_are_one_line(tmp_path, cli, tiny_bert, built):
    from index_builder.__main__ import main as builder

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    common = ["--set", f"encoder.name={tiny_bert}", "--quiet"]
    (tmp_path / "a-dir").mkdir()
    cli(builder, ["build", "--set", f"output={tmp_path / 'x'}", "--set", f"corpus.path={tmp_path / 'a-dir'}",
                  *common], "a-dir")
    (tmp_path / "a-file").write_text("not a folder")
    cli(builder, ["build", "--set", f"output={tmp_path / 'a-file'}", "--set", f"corpus.path={corpus}", *common],
        "a-file")
    for key in ("index.shard_size=0", "index.shard_size=-1", "encoder.batch_size=0"):
        cli(builder, ["build", "--set", f"output={tmp_path / 'y'}", "--set", f"corpus.path={corpus}", "--set", key,
                      *common], key.split("=")[0].split(".")[-1], "out of range")
    cli(builder, ["update", "--index", str(tmp_path / "no-such-index"), "--add", str(corpus), "--quiet"],
        "no-such-index")
    cli(builder, ["update", "--index", str(built), "--add", str(tmp_path / "a-dir"), "--quiet"], "a-dir")
    cli(builder, ["build", "--set", f"output={tmp_path / 'z'}", "--set", f"corpus.path={corpus}", "--set",
                  f"encoder.name={tmp_path / 'no-encoder'}", "--quiet"], "encoder.name")


@pytest.mark.parametrize("args, key", [
    (["--n-docs", "-1"], "n_docs"),
    (["--beams", "-1"], "num_beams"),
    (["--beams", "0"], "num_beams"),
    (["--set", "decoding.max_new_tokens=0"], "max_new_tokens"),
    (["--set", "decoding.length_penalty=nan"], "length_penalty"),
    (["--set", "prior_scale=0"], "prior_scale"),
])
def test_numbers_out_of_range_are_one_line_naming_the_key(args, key, cli, built, tiny_bert, tiny_lms, tmp_path):
    from rag.cli import main as ask
    from tests.conftest import rag_config, rag_yaml

    cfg = rag_yaml(tmp_path / "rag.yaml", rag_config(built, tiny_bert, tiny_lms["llama"]))
    cli(ask, ["ask", "capital", "--config", str(cfg), *args], key)


def test_a_resumed_import_rereads_a_fixed_source(tmp_path, monkeypatch):
    """Killed after some vector shards, its source fixed, an import once kept 4,000 of 5,000 rows from the failed run
    (`corpus.vectors` was not in the fingerprint, and shards were reused before the passage stage was recorded)."""
    from index_builder.importer import import_index

    rows = [{"id": str(i), "title": f"t{i}", "text": f"text {i}"} for i in range(50)]
    write_jsonl(tmp_path / "passages.jsonl", rows)
    vectors = tmp_path / "vectors.npy"
    np.save(vectors, np.zeros((50, 8), np.float32))  # the wrong vectors
    cfg = load_config(BuildConfig, None, [f"output={tmp_path / 'out'}", "corpus.format=npy",
                                          f"corpus.path={tmp_path / 'passages.jsonl'}", f"corpus.vectors={vectors}",
                                          "encoder.name=x", "index.shard_size=10"])
    from rag.files import NpyRows

    monkeypatch.setattr(importlib.import_module("index_builder.importer"), "BATCH", 10)
    real, written = NpyRows.write, []

    def dies_after_three(self, start, block):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(start)
        real(self, start, block)

    monkeypatch.setattr(NpyRows, "write", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        import_index(cfg, progress=False)
    monkeypatch.undo()
    right = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    np.save(vectors, right)  # the source fixed
    with pytest.raises(BuildError, match="changed since the build.*remove the folder and import again"):
        import_index(cfg, progress=False)
    import shutil

    shutil.rmtree(tmp_path / "out")
    index = DenseIndex.load(import_index(cfg, progress=False))
    assert np.allclose(np.asarray(index.vectors[:], np.float32), right.astype(np.float16), atol=1e-2)
