"""The index folder on disk: the one owner of its format (manifest, file names, generations, lock, encoder identity).

Folder layout (see docs/configuration.md, "On-disk format"):
    manifest.json   what was built, with what, file sizes and sha256 checksums, the build report; the current
                    generation's files
    config.yaml     the resolved build config
    passages.arrow  id, doc_id, title, text (row position = FAISS id); later generations add passages.gNNNN.arrow
    vectors.npy     (N, D) float16 or float32 passage vectors d(z), memory-mapped; later: vectors.gNNNN.npy
    index.faiss     the FAISS index over the same rows; later generations: index.gNNNN.faiss
    deleted.gNNNN.npy  rows masked out of search (deleted or replaced documents), until compaction
    build.json, shards/   an unfinished build's state (gone once the manifest is written)

The builder, the updater and the loader all read and write the folder through `IndexFolder`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path

from rag.errors import RagError
from rag.files import TEMP_NAME, expand_path, parse_json, write_json_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG_FILE = "config.yaml"
STORE_FILE = "passages.arrow"
VECTORS_FILE = "vectors.npy"
INDEX_FILE = "index.faiss"
DELETED_FILE = "deleted.npy"
STATE_FILE = "build.json"
SHARDS = "shards"
# A build's work in progress, resumed by a rerun: the imported vectors so far, the trained index, the filled one.
VECTORS_PART = "vectors.partial.npy"
TRAINED_FILE = "index.trained.faiss"
FILLED_FILE = "index.partial.faiss"
LOCK = ".update.lock"
BUILD_HINT = "build it with: python -m index_builder build --config CONFIG (see docs/usage.md)"

# What identifies the encoder that made an index's vectors. A query encoder must agree on the first three (the
# vector space); an update must also use the very same weights (the fingerprint), or old and new passages would not
# be comparable.
SPACE_KEYS = ("dim", "pooling", "normalize", "query_prefix", "passage_prefix")
WEIGHT_KEYS = ("fingerprint",)


class IndexFolderError(RagError, ValueError):
    """A missing or inconsistent index folder; the message names the folder or file."""


class EncoderMismatch(IndexFolderError):
    """An encoder that does not fit the index it is used with."""


class FolderBusy(IndexFolderError):
    """Another process holds the folder's update lock."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    refuse_link(path)
    return {"bytes": path.lstat().st_size, "sha256": sha256_file(path)}


def refuse_link(path: Path) -> None:
    """A part of an index folder must be the folder's own file or folder, never a symbolic link (it could point
    anywhere: reading it would serve another file, writing into it would write elsewhere)."""
    if path.is_symlink():
        raise IndexFolderError(f"{path} is a symbolic link; an index folder's parts must be its own files and "
                               "folders: remove the link (or rebuild the index) and run the command again")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_encoder(built: dict, asked: dict, where: Path, same_weights: bool = False) -> None:
    """The one compatibility check between an index's encoder record and an encoder about to be used with it.

    Raises `EncoderMismatch` naming every key that differs and what to do."""
    keys = SPACE_KEYS + (WEIGHT_KEYS if same_weights else ())
    diff = [f"{k}: index has {built.get(k)!r}, encoder has {asked.get(k)!r}" for k in keys
            if k in asked and built.get(k) is not None and built.get(k) != asked[k]]
    if diff:
        use = "encode with the index's own encoder" if same_weights else "use a query encoder of the same kind"
        raise EncoderMismatch(f"{where}: encoder mismatch: the index was built with {built.get('name')!r}, the "
                              f"encoder is {asked.get('name')!r} ({'; '.join(diff)}); {use}, or rebuild the index "
                              "with this encoder")


class IndexFolder:
    """An index folder: where each file is, what the manifest says, and how a new generation becomes current."""

    def __init__(self, path: str | Path):
        self.path = expand_path(path)

    def __repr__(self) -> str:
        return f"IndexFolder({str(self.path)!r})"

    # names
    def file(self, name: str) -> Path:
        """The path of a file the manifest names: only plain file names inside the folder are accepted."""
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
                or "\x00" in name:
            raise IndexFolderError(f"{self.path / MANIFEST}: entry {name!r} is not a plain file name inside the "
                                   "folder; the manifest is damaged or crafted, rebuild the index")
        return self.path / name

    @staticmethod
    def generation_name(name: str, generation: int) -> str:
        """passages.arrow, 3 -> passages.g0003.arrow"""
        stem, _, ext = name.partition(".")
        return f"{stem}.g{generation:04d}.{ext}"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def shard_path(self, i: int) -> Path:
        return self.path / SHARDS / f"{i:05d}.npy"

    def make_shards(self) -> Path:
        """The build's shard folder, created if missing; refused if it is a link."""
        path = self.path / SHARDS
        refuse_link(path)
        path.mkdir(exist_ok=True)
        return path

    def is_built(self) -> bool:
        return self.manifest_path.is_file()

    # reading
    def read_manifest(self) -> dict:
        if not self.path.is_dir():
            raise IndexFolderError(f"index folder {self.path} does not exist; {BUILD_HINT}")
        path = self.manifest_path
        refuse_link(path)
        if not path.is_file() and self.state_path.is_file():
            raise IndexFolderError(f"{self.path} holds an unfinished build; rerun the same build command to resume it")
        if not path.is_file():
            raise IndexFolderError(f"{self.path} is not a built index folder (no {MANIFEST}); {BUILD_HINT}")
        try:
            manifest = parse_json(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise IndexFolderError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); rebuild with --overwrite") from None
        except (OSError, ValueError) as e:
            raise IndexFolderError(f"{path}: cannot be read ({e}); rebuild with --overwrite") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION \
                or manifest.get("complete") is not True:
            version = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise IndexFolderError(f"{path}: an unfinished or foreign build (format {version}); "
                                   "rerun the build to resume it")
        for name in [*manifest.get("files", {}), *self._layout_names(manifest)]:
            self.file(name)  # every name is a plain file of this folder
        return manifest

    @staticmethod
    def layout(manifest: dict) -> dict:
        """Which files make up the current generation (a fresh build is generation 0 with one segment)."""
        return {
            "generation": manifest.get("generation", 0),
            "segments": manifest.get("segments") or [
                {"store": STORE_FILE, "vectors": VECTORS_FILE, "rows": manifest["count"]}],
            "index_file": manifest.get("index_file", INDEX_FILE),
            "deleted_file": manifest.get("deleted_file"),
        }

    def _layout_names(self, manifest: dict) -> list[str]:
        files = self.layout(manifest)
        names = [files["index_file"]] + [seg[k] for seg in files["segments"] for k in ("store", "vectors")]
        names += list((manifest.get("sparse") or {}).get("files", {}).values())
        return names + ([files["deleted_file"]] if files["deleted_file"] else [])

    def check_files(self, manifest: dict, verify: bool = False) -> None:
        """Every listed file is there with its recorded size (and, with `verify`, its sha256)."""
        for name, entry in manifest["files"].items():
            path = self.file(name)
            refuse_link(path)
            if not path.is_file():
                raise IndexFolderError(f"{path} is missing or not a regular file (listed in {self.manifest_path}); "
                                       "rebuild with --overwrite")
            if not isinstance(entry, dict):
                raise IndexFolderError(f"{self.manifest_path}: entry {name!r} is not a record of size and sha256; "
                                       "the manifest is damaged or crafted, rebuild the index")
            size = path.lstat().st_size
            if size != entry.get("bytes"):
                raise IndexFolderError(f"{path}: size {size} differs from the manifest's {entry.get('bytes')!r}; "
                                       "the file is damaged, rebuild with --overwrite")
            if verify and sha256_file(path) != entry.get("sha256"):
                raise IndexFolderError(f"{path}: checksum differs from the manifest's; the file is damaged")

    def check_encoder(self, manifest: dict, asked: dict, same_weights: bool = False) -> None:
        check_encoder({"dim": manifest.get("dim"), **manifest["encoder"]}, asked, self.manifest_path, same_weights)

    # writing
    def first_manifest(self, *, count: int, dim: int, encoder: dict, index: dict, passages: dict, corpus: dict,
                       identity: dict, build: dict, sparse: dict | None = None) -> dict:
        """The manifest of a fresh build (generation 0), over the files the build wrote under their first names."""
        return {
            "format_version": FORMAT_VERSION,
            "complete": True,
            "created": now(),
            "count": int(count),
            "dim": int(dim),
            "encoder": {**encoder, "dim": int(dim)},
            "index": index,
            "passages": passages,
            "corpus": corpus,
            "identity": identity,
            "generation": 0,
            "segments": [{"store": STORE_FILE, "vectors": VECTORS_FILE, "rows": int(count)}],
            "index_file": INDEX_FILE,
            "deleted_file": None,
            "deleted": 0,
            "history": [],
            "sparse": sparse,
            "files": {name: file_entry(self.file(name)) for name in
                      (STORE_FILE, VECTORS_FILE, INDEX_FILE, *((sparse or {}).get("files", {}).values()))},
            "build": build,
        }

    def next_manifest(self, old: dict, *, segments: list[dict], index_file: str, deleted_file: str | None,
                      deleted: int, count: int, history: dict, index: dict | None = None,
                      sparse: dict | None = None) -> dict:
        """The manifest of the next generation: its files are the segments, index, deletion list and BM25 part
        named here."""
        generation = self.layout(old)["generation"] + 1
        names = [index_file] + [seg[k] for seg in segments for k in ("store", "vectors")]
        names += [deleted_file] if deleted_file else []
        names += list((sparse or {}).get("files", {}).values())
        files = {n: old["files"][n] if n in old["files"] else file_entry(self.file(n)) for n in names}
        return {**old, "generation": generation, "segments": segments, "index_file": index_file,
                "deleted_file": deleted_file, "deleted": int(deleted), "count": int(count), "files": files,
                "index": index if index is not None else old["index"], "sparse": sparse,
                "history": [*old.get("history", []), {"generation": generation, "time": now(), **history}]}

    def write_first(self, manifest: dict) -> None:
        """Make a fresh build current; its build state goes."""
        write_json_atomic(self.manifest_path, manifest)
        self.state_path.unlink(missing_ok=True)

    def switch(self, old: dict, new: dict) -> None:
        """Make `new` current with one atomic rename, then remove the files only the old generation used (open
        memory maps keep working)."""
        self.check_files(new)  # every entry a regular file of this folder before it becomes current
        write_json_atomic(self.manifest_path, new)
        for name in set(old["files"]) - set(new["files"]):
            self.file(name).unlink(missing_ok=True)

    def sweep(self, manifest: dict) -> list[str]:
        """Remove what a writer killed mid-way left behind: files of an earlier generation that the current
        manifest no longer names (a kill between `switch`'s rename and its unlinks), half-written temporaries, and
        every symbolic link (nothing in an index folder is one; removing a link never touches what it points to).
        Called by writers under the lock; returns the names removed."""
        keep = set(manifest["files"])
        pattern = re.compile(r"^(passages|vectors|index|deleted|bm25)(\.g\d{4})?\.([a-z]+\.)?(arrow|npy|faiss|json)"
                             r"(\.tmp)?$")
        gone = []
        for path in self.path.iterdir():
            mode = path.lstat().st_mode
            stale = pattern.match(path.name) and path.name not in keep and stat.S_ISREG(mode)
            if stale or stat.S_ISLNK(mode) or (TEMP_NAME.match(path.name) and stat.S_ISREG(mode)):
                path.unlink(missing_ok=True)
                gone.append(path.name)
            elif stat.S_ISDIR(mode) and path.name.startswith(".bm25-") and path.name.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True)  # a BM25 build's staging folder (rag/retrieval/bm25.py)
                gone.append(path.name)
        if gone:
            log.info("%s: removed %s, left by an earlier writer that was stopped", self.path, ", ".join(sorted(gone)))
        return sorted(gone)

    @contextmanager
    def lock(self):
        """One writer per folder. flock is released by the kernel when a process dies, so a killed update leaves
        no stale lock behind."""
        if not self.path.is_dir():
            raise IndexFolderError(f"index folder {self.path} does not exist; {BUILD_HINT}")
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:  # ELOOP: a planted link, never followed
            raise IndexFolderError(f"{path}: cannot be opened as the folder's lock file ({e.strerror}); if it is a "
                                   "link or not a regular file, remove it and run the command again") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IndexFolderError(f"{path} is not a regular file; remove it and run the command again")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                raise FolderBusy(f"{self.path} is being updated by another process ({holder or 'unknown'}); "
                                 "wait for it to finish and run this update again") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
            yield
        finally:
            os.close(fd)
