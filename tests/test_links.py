"""An index folder from someone else may hold planted symbolic links: no writer follows one, no reader serves one.

One test per writer (build, import, update, compact, build --overwrite, the lock) and one for the readers."""

import os

import numpy as np
import pytest

from index_builder.build import build
from index_builder.importer import import_index
from index_builder.update import compact, update
from rag.config import BuildConfig, load_config
from rag.retrieval.index import DenseIndex
from rag.retrieval.index_folder import IndexFolder, IndexFolderError
from tests.conftest import DOCS, build_cfg, write_jsonl


@pytest.fixture
def built(tmp_path, tiny_bert):
    return build(build_cfg(tmp_path, tiny_bert, write_jsonl(tmp_path / "corpus.jsonl", DOCS)), progress=False)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def untouched(victim):
    return victim.read_text() == "precious\n" and not victim.is_symlink()


def add_file(tmp_path):
    return write_jsonl(tmp_path / "add.jsonl", [{"id": "rome", "title": "Rome", "text": "Rome is in Italy."}])


def test_the_lock_file_is_never_followed(built, victim):
    (built / ".update.lock").unlink(missing_ok=True)
    (built / ".update.lock").symlink_to(victim)
    with pytest.raises(IndexFolderError, match=r"\.update\.lock"), IndexFolder(built).lock():
        pass
    assert untouched(victim)


@pytest.mark.parametrize("name", ["passages.g0001.arrow", "vectors.g0001.npy", "index.g0001.faiss",
                                  "manifest.json.tmp", ".manifest.json.0123456789ab.tmp"])
def test_update_writes_nothing_through_a_planted_link(built, victim, tmp_path, name):
    """A dangling or live link under a name the next generation will use: the sweep removes it (the link only)."""
    (built / name).symlink_to(victim if "manifest" in name else tmp_path / "elsewhere" / name)
    report = update(built, add=add_file(tmp_path), progress=False)
    assert report.generation == 1 and untouched(victim) and not (tmp_path / "elsewhere").exists()
    assert not any(p.is_symlink() for p in built.iterdir())
    assert "rome#0" in DenseIndex.load(built, verify=True).store.column("id")


def test_compact_writes_nothing_through_a_planted_link(built, victim, tmp_path):
    update(built, add=add_file(tmp_path), progress=False)
    for name in ("passages.g0002.arrow", "vectors.g0002.npy", "index.g0002.faiss"):
        (built / name).symlink_to(victim)
    compact(built, progress=False)
    assert untouched(victim) and not any(p.is_symlink() for p in built.iterdir())
    DenseIndex.load(built, verify=True)


def test_a_manifest_entry_that_is_a_link_is_refused_by_load_and_verify(built, tmp_path):
    """A link out of the folder once passed `verify` ("sha256 match") and was served."""
    outside = tmp_path / "outside.faiss"
    os.replace(built / "index.faiss", outside)
    (built / "index.faiss").symlink_to(outside)
    for verify in (False, True):
        with pytest.raises(IndexFolderError, match="index.faiss is a symbolic link"):
            DenseIndex.load(built, verify=verify)


def test_a_linked_manifest_is_refused(built, tmp_path):
    os.replace(built / "manifest.json", tmp_path / "m.json")
    (built / "manifest.json").symlink_to(tmp_path / "m.json")
    with pytest.raises(IndexFolderError, match="manifest.json is a symbolic link"):
        DenseIndex.load(built)


def killed_at(monkeypatch, module: str, stage: str, run):
    """Run `run` with `module.stage` raising KeyboardInterrupt: a half-built folder to resume."""
    import importlib

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(importlib.import_module(module), stage, killed)
        with pytest.raises(KeyboardInterrupt):
            run()


def test_build_writes_nothing_through_planted_links(tmp_path, tiny_bert, victim, monkeypatch):
    """A half-built folder (killed after its passage stage) with links where the resumed build writes."""
    cfg = build_cfg(tmp_path, tiny_bert, write_jsonl(tmp_path / "corpus.jsonl", DOCS))
    out = tmp_path / "index"
    killed_at(monkeypatch, "index_builder.build", "_encode_shards", lambda: build(cfg, progress=False))
    for name in ("vectors.npy", "vectors.npy.tmp", "index.faiss", "index.faiss.tmp", "config.yaml"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victim)
    build(cfg, progress=False)
    assert untouched(victim)
    DenseIndex.load(out, verify=True)


def test_a_shard_folder_that_is_a_link_is_refused(tmp_path, tiny_bert, monkeypatch):
    cfg = build_cfg(tmp_path, tiny_bert, write_jsonl(tmp_path / "corpus.jsonl", DOCS))
    out = tmp_path / "index"
    killed_at(monkeypatch, "index_builder.build", "_encode_shards", lambda: build(cfg, progress=False))
    (out / "shards").rmdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(IndexFolderError, match="shards is a symbolic link"):
        build(cfg, progress=False)
    assert not any((tmp_path / "elsewhere").iterdir())


def test_import_writes_nothing_through_planted_links(tmp_path, victim, monkeypatch):
    rows = [{"id": str(i), "title": f"t{i}", "text": f"text {i}"} for i in range(40)]
    write_jsonl(tmp_path / "passages.jsonl", rows)
    np.save(tmp_path / "vectors.npy", np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    cfg = load_config(BuildConfig, None, [f"output={tmp_path / 'imported'}", "corpus.format=npy",
                                          f"corpus.path={tmp_path / 'passages.jsonl'}",
                                          f"corpus.vectors={tmp_path / 'vectors.npy'}", "encoder.name=x"])
    out = tmp_path / "imported"
    killed_at(monkeypatch, "index_builder.importer", "refuse_duplicate_ids", lambda: import_index(cfg, progress=False))
    for name in ("passages.arrow", "vectors.npy", "index.faiss", "config.yaml"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victim)
    import_index(cfg, progress=False)
    assert untouched(victim)
    assert len(DenseIndex.load(out, verify=True)) == 40


def test_overwrite_never_removes_a_folder_it_did_not_make(built, tmp_path, tiny_bert):
    """`build --overwrite` once removed any sibling named .NAME.old before moving the old index there."""
    precious = tmp_path / ".index.old"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    cfg = build_cfg(tmp_path, tiny_bert, write_jsonl(tmp_path / "corpus2.jsonl", DOCS[:3]))
    build(cfg, overwrite=True, progress=False)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".index")] == [".index.old"]


def test_overwrite_refuses_a_staging_folder_that_is_a_link(built, tmp_path, tiny_bert):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".index.new").symlink_to(tmp_path / "elsewhere")
    cfg = build_cfg(tmp_path, tiny_bert, write_jsonl(tmp_path / "corpus2.jsonl", DOCS[:3]))
    with pytest.raises(IndexFolderError, match=r"\.index\.new is a symbolic link"):
        build(cfg, overwrite=True, progress=False)
    assert not any((tmp_path / "elsewhere").iterdir())
