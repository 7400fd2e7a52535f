"""Build an index folder: corpus -> passages (Arrow) -> d(z) in shards (.npy) -> vectors.npy -> FAISS -> manifest.

Each stage writes to a temporary name and renames when done, and `build.json` records the config, so a killed
build rerun with the same config keeps every finished stage and shard and redoes only the rest.
Started with `accelerate launch`, every process encodes a contiguous block of shards; the main process does the rest.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rag.config import BuildConfig, save_config
from rag.errors import RagError
from rag.files import NpyRows, open_npy, parse_json, save_npy, write_faiss, write_json_atomic, writing
from rag.index_kinds import Checkpoints
from rag.precision import name_of
from rag.retrieval.encoders import encoder_record
from rag.retrieval.index import build_faiss, factory_string
from rag.retrieval.index_folder import (
    FILLED_FILE,
    INDEX_FILE,
    MANIFEST,
    SHARDS,
    STATE_FILE,
    STORE_FILE,
    TRAINED_FILE,
    VECTORS_FILE,
    IndexFolder,
    refuse_link,
)
from rag.retrieval.passages import ReadReport, iter_passages
from rag.retrieval.store import PassageStore, StoreWriter

log = logging.getLogger(__name__)

# Settings that change how a build runs or how it is searched, not what it contains: a resume may change them.
RUNTIME_KEYS = {
    "encoder": {"batch_size", "batch_tokens", "device", "dtype", "precision"},
    "index": {"ef_search", "nprobe", "rerank", "use_gpu"},
}


class BuildError(RagError):
    pass


# Keys added after folders were built, at their default: left out of the identity, so that an older folder (whose
# identity lacks them) still matches a config that leaves them at the default.
LATER_KEYS = {"index": {"coarse": "flat"}, "encoder": {"query_prefix": "", "passage_prefix": ""}}


def identity(cfg: BuildConfig) -> dict:
    """The parts of a config that decide an index's contents (compared when resuming)."""
    d = asdict(cfg)
    d.pop("output")
    for section, keys in RUNTIME_KEYS.items():
        for k in keys:
            d[section].pop(k, None)
    for section, defaults in LATER_KEYS.items():
        for k, default in defaults.items():
            if d[section].get(k) == default:
                d[section].pop(k)
    return d


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: folder has {a!r}, config has {b!r}")
    return out


def is_build(out: Path) -> bool:
    """Whether `out` holds an index build (finished or not): the only kind of folder --overwrite replaces."""
    return (out / STATE_FILE).is_file() or (out / MANIFEST).is_file()


def _saved_identity(out: Path) -> dict | None:
    for name in (STATE_FILE, MANIFEST):
        if (out / name).is_file():
            return _read_json(out / name).get("identity")
    return None


def _read_json(path: Path) -> dict:
    """A build's own JSON (build.json, manifest.json); damage is one error naming the file."""
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: cannot be read ({e}); rebuild with --overwrite") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path}: not a JSON object; rebuild with --overwrite")
    return data


def check_folder(out: Path, cfg: BuildConfig, how: str = "rerun with --overwrite") -> dict | None:
    """Decide what to do with an existing output folder; return the saved build state when resuming. `how` says
    how to start afresh."""
    if not out.exists() or not any(out.iterdir()):
        return None
    for name in (STATE_FILE, MANIFEST):
        path = out / name
        if path.is_file():
            diff = _differences(_saved_identity(out) or {}, identity(cfg))
            if diff:
                raise BuildError(
                    f"{out} holds a build of another config ({'; '.join(diff)}); "
                    "use another output folder or --overwrite"
                )
            if name == MANIFEST:
                return {"complete": True}
            state = _read_json(out / STATE_FILE)
            _check_same_corpus(out, cfg, state, how)
            return state
    raise BuildError(f"{out} exists and is not an index build; use another output folder or --overwrite")


def corpus_fingerprint(cfg: BuildConfig) -> dict:
    """What identifies the source files a build or import reads (the corpus, and an import's `.npy` vectors): size,
    mtime and a hash of the first and last MiB of each (a directory: of each file in it, in name order). Cheap
    for 13 GB, and any edit changes it."""
    import hashlib

    roots = [Path(p).expanduser() for p in (cfg.corpus.path, cfg.corpus.vectors) if p is not None]
    if not roots:  # the demo corpus: an installed package
        return {}
    h, size, count = hashlib.sha256(), 0, 0
    for root in roots:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            if not f.exists():
                continue  # a missing source is reported by the reader that needs it
            st = f.stat()
            size, count = size + st.st_size, count + 1
            h.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if st.st_size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return {"files": count, "bytes": size, "sha256": h.hexdigest()[:32]}


def _check_same_corpus(out: Path, cfg: BuildConfig, state: dict, how: str) -> None:
    """A resumed build or import must read the sources it started from once anything was written from them (the
    passage stage, or a vector shard): an edited source would otherwise mix the old rows with the new."""
    saved, now = state.get("corpus"), corpus_fingerprint(cfg)
    if saved == now:
        return
    shards = out / SHARDS
    started = bool(state.get("stages") or state.get("progress")) or (shards.is_dir() and any(shards.iterdir()))
    if saved is not None and started:
        sources = " and ".join(str(p) for p in (cfg.corpus.path, cfg.corpus.vectors) if p)
        raise BuildError(f"{sources} changed since the build in {out} started ({saved} then, {now} now); {how} to "
                         "build from the sources as they are")
    state["corpus"] = now


def save_state(out: Path, state: dict) -> None:
    write_json_atomic(out / STATE_FILE, state)


def _write_passages(out: Path, cfg: BuildConfig, progress: bool) -> dict:
    from tqdm.auto import tqdm

    report = ReadReport()
    with writing(out / STORE_FILE) as tmp:
        with StoreWriter(tmp) as writer, tqdm(unit="passage", desc="passages", disable=not progress) as bar:
            for p in iter_passages(cfg.corpus, cfg.passages, report):
                writer.add([p])
                bar.update(1)
        refuse_duplicate_ids(tmp, cfg)
    if report.passages_written == 0:
        raise BuildError(f"the corpus gave no passages ({asdict(report)}); check corpus.path and corpus.format")
    return asdict(report)


def refuse_duplicate_ids(store: Path, cfg: BuildConfig) -> None:
    """Two documents with one id would give two passages "id#0": updates and deletes by id could not tell them
    apart. Checked on the written store's id column (Arrow's hashing, no Python set of 21M ids)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = PassageStore(store).table.column("id")
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), pa.scalar(1, pa.int64())))
    if len(dup):
        docs = sorted({str(v).rsplit("#", 1)[0] for v in dup.field("values").to_pylist()[:10]})
        store.unlink(missing_ok=True)
        raise BuildError(f"{cfg.corpus.path or cfg.corpus.format}: {len(dup)} passage ids occur twice, from duplicate "
                         f"document ids ({', '.join(docs)}); give every document its own id (corpus.id_field)")


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(count, s + shard_size)) for s in range(0, count, shard_size)]


def shard_path(out: Path, i: int) -> Path:
    return IndexFolder(out).shard_path(i)


def _encode_shards(out: Path, cfg: BuildConfig, shards: list[int], count: int, device: str | None,
                   progress: bool) -> str:
    """Encode this process's shards that are not on disk yet; return the encoder's fingerprint."""
    from rag.retrieval.encoders import Encoder

    todo = [i for i in shards if not shard_path(out, i).is_file()]
    if len(todo) < len(shards):
        log.info("resuming the build of %s: %d of %d shards already encoded", out, len(shards) - len(todo),
                 len(shards))
    enc_cfg = cfg.encoder if device is None else type(cfg.encoder)(**{**asdict(cfg.encoder), "device": device})
    encoder = Encoder.from_config(enc_cfg)
    store = PassageStore(out / STORE_FILE)
    ranges = shard_ranges(count, cfg.index.shard_size)
    for i in todo:
        start, stop = ranges[i]
        titles = store.column("title", start, stop)
        texts = store.column("text", start, stop)
        vecs = encoder.encode(texts, titles, progress=f"encode shard {i + 1}/{len(ranges)}" if progress else False)
        save_npy(shard_path(out, i), vecs.astype(cfg.index.vector_dtype))  # a shard exists only once it is whole
    return {"fingerprint": encoder.fingerprint, "precision": name_of(encoder.compute_dtype)}


def merge_shards(out: Path, cfg: BuildConfig, count: int, dim: int) -> None:
    with writing(out / VECTORS_FILE) as tmp:
        merged = open_npy(tmp, cfg.index.vector_dtype, (count, dim))
        for i, (start, stop) in enumerate(shard_ranges(count, cfg.index.shard_size)):
            merged[start:stop] = np.load(shard_path(out, i), mmap_mode="r")
        merged.flush()
        del merged
    shutil.rmtree(out / SHARDS)


def build(cfg: BuildConfig, overwrite: bool = False, progress: bool = True) -> Path:
    """Build (or resume, or find already built) the index folder `cfg.output`; return its path."""
    import torch
    from accelerate import PartialState

    dist = PartialState(cpu=not torch.cuda.is_available())  # several CPU processes talk over gloo
    check_settings(cfg)
    out = IndexFolder(cfg.output).path
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} is a file, not a folder; give the index a folder of its own")
    if overwrite and out.exists() and any(out.iterdir()):
        return _overwrite(cfg, out, dist, progress)
    t0 = time.perf_counter()
    state = None
    if dist.is_main_process:
        state = check_folder(out, cfg)
        if state and state.get("complete"):
            log.info("%s is already built with this config", out)
        else:
            out.mkdir(parents=True, exist_ok=True)
            state = state or {"identity": identity(cfg), "corpus": corpus_fingerprint(cfg), "stages": {}}
            save_state(out, state)
            save_config(cfg, out / "config.yaml")
            if "passages" not in state["stages"]:
                state["stages"]["passages"] = {"report": _write_passages(out, cfg, progress),
                                               "seconds": time.perf_counter() - t0}
                save_state(out, state)
    dist.wait_for_everyone()
    if (out / MANIFEST).is_file() and not (out / STATE_FILE).is_file():
        return out
    state = _read_json(out / STATE_FILE)
    count = len(PassageStore(out / STORE_FILE))
    if "vectors" not in state["stages"]:
        t1 = time.perf_counter()
        n_shards = len(shard_ranges(count, cfg.index.shard_size))
        mine = np.array_split(np.arange(n_shards), dist.num_processes)[dist.process_index].tolist()
        device = str(dist.device) if dist.num_processes > 1 and cfg.encoder.device == "auto" else None
        IndexFolder(out).make_shards()
        encoded = _encode_shards(out, cfg, mine, count, device, progress and dist.is_local_main_process)
        dist.wait_for_everyone()
        if dist.is_main_process:
            dim = np.load(shard_path(out, 0), mmap_mode="r").shape[1]
            merge_shards(out, cfg, count, dim)
            state["stages"]["vectors"] = {"seconds": time.perf_counter() - t1, **encoded}
            save_state(out, state)
    if dist.is_main_process:
        finish(out, cfg, state, progress)
    dist.wait_for_everyone()
    return out


def _overwrite(cfg: BuildConfig, out: Path, dist, progress: bool) -> Path:
    """--overwrite: build the new index beside the old one (.NAME.new, itself resumable) and replace the old only
    once the new one is whole, so a failing build leaves the old index as it was. Only an index build is
    replaced: any other folder is refused, never deleted."""
    from dataclasses import replace

    if not is_build(out):
        raise BuildError(f"{out} is not an index build (no {MANIFEST} or {STATE_FILE}); --overwrite replaces only "
                         "index folders: choose another output folder")
    staging = out.with_name(f".{out.name}.new")
    refuse_link(staging)
    if dist.is_main_process and is_build(staging) and _saved_identity(staging) != identity(cfg):
        shutil.rmtree(staging)  # a staging build of another config, left by a failed overwrite: ours to remove
    dist.wait_for_everyone()
    build(replace(cfg, output=str(staging)), overwrite=False, progress=progress)
    if dist.is_main_process:
        with IndexFolder(out).lock():  # no update or compact runs on the old index while it is replaced
            # A fresh empty folder of our own to rename the old index onto: nothing else of that name is touched.
            old = tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        save_config(cfg, out / "config.yaml")
        log.info("replaced %s with the new build", out)
    dist.wait_for_everyone()
    return out


def check_settings(cfg: BuildConfig) -> None:
    """Settings only a later stage would trip on, refused before any work: the stemmer (the index kind is checked
    where the config is parsed)."""
    from rag.retrieval import bm25

    if cfg.sparse.kind == "bm25":
        bm25.stemmer(cfg.sparse.language)


def build_sparse(folder: IndexFolder, generation: int, store: PassageStore, cfg) -> dict:
    """The BM25 part over every row of `store` (deleted rows are masked at search, as in FAISS)."""
    from rag.retrieval import bm25

    log.info("BM25 over %d passages", len(store))
    return bm25.build(folder, generation, store.column("title"), store.column("text"), cfg)


class FolderCheckpoints(Checkpoints):
    """The index stage's progress in the build folder: the trained index (TRAINED_FILE), then the filled one
    (FILLED_FILE) every `every` rows, each recorded in build.json once its file is whole."""

    def __init__(self, out: Path, state: dict, every: int):
        self.out, self.state, self.every = out, state, every
        self.progress = state.setdefault("progress", {})

    def resume(self):
        import faiss

        for name, key in ((FILLED_FILE, "filled_rows"), (TRAINED_FILE, "trained")):
            if key in self.progress and (self.out / name).is_file():
                refuse_link(self.out / name)
                log.info("resuming the index of %s from %s", self.out, name)
                rows = self.progress[key] if key == "filled_rows" else 0
                return faiss.read_index(str(self.out / name)), self.progress.get("mips_norm2"), rows
        return None, None, 0

    def trained(self, index, norm2, seconds: float) -> None:
        write_faiss(index, self.out / TRAINED_FILE)
        self.progress.update(trained=True, mips_norm2=norm2, train_seconds=seconds)
        save_state(self.out, self.state)

    def due(self, rows: int, total: int) -> bool:
        return rows < total and rows // self.every > (self.progress.get("filled_rows", 0)) // self.every

    def filled(self, index, norm2, rows: int) -> None:
        write_faiss(index, self.out / FILLED_FILE)
        self.progress["filled_rows"] = rows
        save_state(self.out, self.state)

    def done(self) -> None:
        for name in (TRAINED_FILE, FILLED_FILE):
            (self.out / name).unlink(missing_ok=True)
        self.state.pop("progress", None)


CHECKPOINT_ROWS = 2_000_000  # the index is saved after every this many rows added: a kill loses minutes, not hours


def finish(out: Path, cfg: BuildConfig, state: dict, progress: bool) -> None:
    vectors = NpyRows(out / VECTORS_FILE)  # read in chunks, never mapped whole into the resident set
    count, dim = vectors.shape
    if "index" not in state["stages"]:
        t = time.perf_counter()
        saved = FolderCheckpoints(out, state, CHECKPOINT_ROWS)
        index, extra = build_faiss(vectors, cfg.index, progress, saved)
        write_faiss(index, out / INDEX_FILE)
        train = saved.progress.get("train_seconds")
        saved.done()
        state["stages"]["index"] = {"seconds": time.perf_counter() - t, "train_seconds": train, **extra}
        save_state(out, state)
    folder = IndexFolder(out)
    if cfg.sparse.kind == "bm25" and "sparse" not in state["stages"]:
        t = time.perf_counter()
        state["stages"]["sparse"] = {"record": build_sparse(folder, 0, PassageStore(out / STORE_FILE), cfg.sparse),
                                     "seconds": time.perf_counter() - t}
        save_state(out, state)
    stages = state["stages"]
    manifest = folder.first_manifest(
        count=count, dim=dim,
        encoder={**encoder_record(cfg.encoder), "fingerprint": stages["vectors"]["fingerprint"]},
        index={**asdict(cfg.index), "factory": factory_string(cfg.index),
               "mips_norm2": stages["index"].get("mips_norm2")},
        passages=asdict(cfg.passages), corpus=asdict(cfg.corpus), identity=state["identity"],
        sparse=stages.get("sparse", {}).get("record"),
        build={**stages["passages"]["report"], "seconds": {k: round(v["seconds"], 2) for k, v in stages.items()},
               "precision": stages["vectors"].get("precision", "float32"),
               "index_training_seconds": stages["index"].get("train_seconds")},
    )
    folder.write_first(manifest)
