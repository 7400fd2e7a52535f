"""Which RagConfig a `RagPipeline.load` source means: a save_pretrained folder, a YAML file (or a shipped config's
name), a RagConfig, a transformers RAG checkpoint named as a config's source, or None for the embedded default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rag.config import (
    SAVED_CONFIG,
    ConfigError,
    RagConfig,
    apply_overrides,
    from_dict,
    load_config,
    resolve_config_path,
    to_dict,
)
from rag.weights import ADAPTER_CONFIG

DEFAULT_CONFIG = "configs/rag/demo.yaml"


def load_rag_config(source: str | Path | RagConfig | None = None, overrides: tuple[str, ...] = ()) -> RagConfig:
    """The RagConfig of a `load` source: a save_pretrained folder, a YAML file (or a shipped config's name such as
    "configs/rag/demo.yaml"), a RagConfig, or None for the embedded default."""
    if isinstance(source, RagConfig):
        return from_dict(RagConfig, apply_overrides(to_dict(source), overrides))
    folder = Path(source).expanduser() if source is not None else None
    if folder is not None and folder.is_dir():
        if not (folder / SAVED_CONFIG).is_file():
            raise ConfigError(f"{folder} has no {SAVED_CONFIG}: it is not a folder written by "
                              "RagPipeline.save_pretrained or training; give a RAG config YAML or such a folder")
        # each part is whole weights (name = the subfolder) or an adapter over the base weights rag.yaml names
        parts = [f"{part}.adapter={folder / part}" if (folder / part / ADAPTER_CONFIG).is_file()
                 else f"{part}.name={folder / part}" for part in ("query_encoder", "generator")]
        return load_config(RagConfig, folder / SAVED_CONFIG, (*parts, *overrides))
    cfg = load_config(RagConfig, resolve_config_path(source or DEFAULT_CONFIG), overrides)
    if cfg.source and cfg.source.startswith(TRANSFORMERS) and cfg.query_encoder is None:
        return _from_transformers_config(cfg)
    return cfg


TRANSFORMERS = "transformers:"  # `source: transformers:NAME` in a RAG config: the models of that RAG checkpoint


def _from_transformers_config(cfg: RagConfig) -> RagConfig:
    """A config naming a transformers RAG checkpoint as its source (configs/rag/rag-token-nq.yaml): the converted
    checkpoint's models, mode and context settings, with the config's index, k, decoding, device and precision."""
    from rag.transformers_rag import ensure_converted

    base = load_rag_config(ensure_converted(cfg.source[len(TRANSFORMERS):].split(" ")[0], cfg.index))
    return dataclasses.replace(base, index=cfg.index, build=cfg.build, n_docs=cfg.n_docs, decoding=cfg.decoding,
                               device=cfg.device, faiss_gpu=cfg.faiss_gpu, precision=cfg.precision,
                               prior_scale=cfg.prior_scale)
