"""Bring in a transformers RAG checkpoint (`facebook/rag-token-nq`, `facebook/rag-sequence-nq`, or a folder written
by `RagTokenForGeneration.save_pretrained`): its DPR question encoder becomes BERT_q and its BART its generator.

The checkpoint is converted once into this project's own folder (query_encoder/, generator/, rag.yaml: safetensors,
no pickle) and loaded from there; `rag.yaml` records the source. DPR's question embedding is the [CLS] vector of its
BERT (no pooler layer, no normalisation); the index must hold DPR passage vectors (e.g. wiki_dpr imported with
`index_builder import`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rag.config import SAVED_CONFIG, ConfigError, DecodingConfig, EncoderConfig, GeneratorConfig, RagConfig, save_config
from rag.files import cache_dir
from rag.weights import loading, quiet_bars, resolve

log = logging.getLogger(__name__)

RAG_CLASSES = {"RagTokenForGeneration": "token", "RagSequenceForGeneration": "sequence"}


def converted_folder(source: str) -> Path:
    """Where a checkpoint's conversion is cached: $RAG_CACHE/models/<name>--converted."""
    return cache_dir() / "models" / (str(source).strip("/").replace("/", "--") + "--converted")


def ensure_converted(source: str, index: str, out: str | Path | None = None) -> Path:
    """The converted folder of `source` (default: `converted_folder`), converting it first if it is not there."""

    out = Path(out).expanduser() if out else converted_folder(source)
    return out if (out / SAVED_CONFIG).is_file() else convert(source, index, out)


def convert(source: str, index: str, out: str | Path | None = None) -> Path:
    """Convert the transformers RAG checkpoint `source` into a folder `RagPipeline.load` reads; return it."""
    from transformers import AutoConfig, AutoTokenizer, RagSequenceForGeneration, RagTokenForGeneration

    out = Path(out).expanduser() if out else converted_folder(source)
    path = resolve(source)
    with loading("from_transformers", source):
        config = AutoConfig.from_pretrained(path)
    if config.model_type != "rag":
        raise ConfigError(f"{source}: a {config.model_type!r} checkpoint, not a transformers RAG model "
                          f"({' or '.join(RAG_CLASSES)})")
    arch = next((a for a in (config.architectures or []) if a in RAG_CLASSES), "RagTokenForGeneration")
    mode = RAG_CLASSES[arch]
    cls = RagTokenForGeneration if mode == "token" else RagSequenceForGeneration
    with loading("from_transformers", source):
        model = cls.from_pretrained(path)
        q_tok = AutoTokenizer.from_pretrained(path, subfolder="question_encoder_tokenizer")
        g_tok = AutoTokenizer.from_pretrained(path, subfolder="generator_tokenizer")
    qe = model.rag.question_encoder
    if config.question_encoder.model_type != "dpr":
        raise ConfigError(f"{source}: its question encoder is {config.question_encoder.model_type!r}; only DPR "
                          "question encoders are read")
    if getattr(config.question_encoder, "projection_dim", 0):
        raise ConfigError(f"{source}: a DPR question encoder with projection_dim > 0 is not supported")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_bars():
        qe.save_pretrained(tmp / "query_encoder", safe_serialization=True)  # a DPRQuestionEncoder, as on the hub
        q_tok.save_pretrained(tmp / "query_encoder")
        model.rag.generator.save_pretrained(tmp / "generator", safe_serialization=True)
        g_tok.save_pretrained(tmp / "generator")
    gen_cfg = model.rag.generator.generation_config
    cfg = RagConfig(
        index=str(index), source=f"transformers:{source} ({arch})",
        query_encoder=EncoderConfig(name="query_encoder", pooling="cls", normalize=False,
                                    max_length=min(512, int(q_tok.model_max_length or 512)), title="pair"),
        generator=GeneratorConfig(name="generator", family="seq2seq", chat_template=False,
                                  max_context_length=int(config.max_combined_length or 300)),
        decoding=DecodingConfig(num_beams=int(getattr(gen_cfg, "num_beams", None) or 1),
                                max_new_tokens=int(getattr(config, "max_length", None) or 20)),
        mode=mode, n_docs=int(config.n_docs or 5))
    save_config(cfg, tmp / "rag.yaml")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("converted %s (%s) into %s", source, arch, out)
    return out
