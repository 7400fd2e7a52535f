"""First use at the edge (`rag ask`, `rag.answer`, eval, training): build a config's missing index, then load.

The builder runs as its own program (`python -m index_builder build`), so that rag/ never imports index_builder/,
and its progress and its resume after Ctrl-C are the builder's own.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from pathlib import Path

from rag.config import RagConfig, resolve_config_path
from rag.retrieval.index_folder import IndexFolder, IndexFolderError

log = logging.getLogger(__name__)


def load_pipeline(source: str | Path | RagConfig | None = None, overrides: tuple[str, ...] = (),
                  trainable: bool = False):
    """`RagPipeline.load` of a source (see `load_rag_config`) whose missing index is built first."""
    from rag.pipeline import RagPipeline
    from rag.resolve import load_rag_config

    cfg = load_rag_config(source, tuple(overrides))
    ensure_index(cfg)
    return RagPipeline.load(cfg, trainable=trainable)


@functools.cache
def default_pipeline():
    """The embedded default (configs/rag/demo.yaml), loaded once per process for `rag.answer`."""
    return load_pipeline()


def ensure_index(cfg: RagConfig) -> None:
    """Build `cfg.index` from the index config `cfg.build` when the folder holds no finished index; add its BM25
    part when the config retrieves with BM25 and an index built before it has none."""
    folder = IndexFolder(cfg.index)
    if folder.is_built() and cfg.build and cfg.retrieval != "dense" and not folder.read_manifest().get("sparse"):
        log.info("adding a BM25 part to %s (once)", folder.path)
        _run([sys.executable, "-m", "index_builder", "update", "--index", str(folder.path), "--set",
              "sparse.kind=bm25", "--quiet"], f"adding a BM25 part to {folder.path} failed (see above)")
    if folder.is_built() or not cfg.build:
        return
    config = resolve_config_path(cfg.build)
    resuming = folder.state_path.is_file()
    log.info("%s the index %s from %s (once; later runs load it, and a stopped build resumes)",
             "resuming" if resuming else "building", folder.path, config)
    _run([sys.executable, "-m", "index_builder", "build", "--config", str(config), "--set", f"output={folder.path}"],
         f"building {folder.path} from {config} failed (see above); fix what it says and run again: a rerun resumes "
         "the build")


def _run(command: list[str], failed: str) -> None:
    try:
        out = sys.stderr.fileno()  # the builder's lines go to stderr: stdout stays the caller's (rag ask --json)
    except (AttributeError, OSError, ValueError):
        out = None  # a captured stderr (tests, notebooks) has no file descriptor
    if subprocess.run(command, stdout=out).returncode != 0:
        raise IndexFolderError(failed)
