"""The one way in: `RagPipeline.load(...)`, then `retrieve`, `answer`, `answer_batch`; devices are chosen here.

Everything outside rag/ (the CLIs, eval, the benchmarks, the trainer's loop) goes through this class.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rag.adapters import has_adapter, name_base_model
from rag.config import (
    SAVED_CONFIG,
    DecodingConfig,
    RagConfig,
    from_dict,
    save_config,
    to_dict,
)
from rag.errors import BadInput, BadType
from rag.metrics import passage_has_answer
from rag.model import RagModel
from rag.precision import name_of
from rag.resolve import load_rag_config  # noqa: F401 - importable from here, as the README shows
from rag.retrieval.index import DenseIndex
from rag.retrieval.index_folder import IndexFolder
from rag.retrieval.retriever import NonFinite, Retrieved, check_questions
from rag.weights import quiet_bars

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One retrieved passage."""

    id: str
    doc_id: str
    title: str
    text: str
    score: float  # d(z)ᵀq(x); with retrieval bm25 or hybrid, the scaled BM25 or the fused score
    dense_rank: int | None = None  # 1-based rank on the dense side, None if it did not find the passage
    bm25_rank: int | None = None  # the same on the BM25 side


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float  # d(z)ᵀq(x); with retrieval bm25 or hybrid, the scaled BM25 or the fused score
    prior: float  # p(z|x)
    posterior: float  # p(z|x,y): how much this passage supports the answer
    dense_rank: int | None = None  # which side found it, at which rank (1-based; None: not that side)
    bm25_rank: int | None = None


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    score: float
    mode: str
    passages: tuple[Passage, ...]
    tokens: tuple[str, ...] = ()
    # RAG-token: one row per answer token, one column per passage: p(z | x, y_1..t), so that a person can see
    # which passage produced which word (a tuple of tuples; `numpy.array(a.token_posteriors)` is (T, K)).
    token_posteriors: tuple[tuple[float, ...], ...] | None = None
    # Indices of the passages that contain the answer (normalised, whole words), and their posterior mass.
    supporting: tuple[int, ...] = ()
    support: float = 0.0

    @property
    def supported(self) -> bool:
        """Whether the retrieved passages back the answer: it occurs in a passage that holds at least
        `SUPPORT_MIN` of the posterior. Otherwise the answer is the generator's guess, not read from a passage."""
        return bool(self.supporting) and self.support >= SUPPORT_MIN

    def to_json(self) -> dict:
        """What `rag ask --json` prints and `/answer` returns: the fields and `supported`; a NaN or infinite number
        (a damaged model) becomes null, as strict JSON has no such values."""
        return _finite({**asdict(self), "supported": self.supported})


def _finite(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


SUPPORT_MIN = 0.2  # posterior mass; with k=5 a fifth is what one passage holds under a uniform posterior


class RagPipeline:
    """BERT_q + index + generator on one device. Public calls never change the pipeline, except `reload_index`."""

    def __init__(self, model: RagModel, cfg: RagConfig):
        self.model = model
        self.cfg = cfg

    @classmethod
    def load(cls, source: str | Path | RagConfig | None = None, overrides: tuple[str, ...] = (),
             trainable: bool = False) -> RagPipeline:
        """Load from a save_pretrained folder, a RAG config YAML, a `RagConfig`, or (None) the embedded default.

        The index folder must be built (`python -m index_builder build`; `rag ask` builds the demo's on first use).
        BERT_q, the generator and the index go to `cfg.device`, the weights in the dtype of `cfg.precision`; with
        `trainable` they stay float32 (a trainer applies the precision as mixed precision) and the config keeps
        the precision to serve with."""
        cfg = load_rag_config(source, tuple(overrides))
        weights = "float32" if trainable else cfg.precision
        model, qcfg = RagModel.load(cfg, weights)
        return cls(model, dataclasses.replace(cfg, query_encoder=qcfg))

    @classmethod
    def from_transformers(cls, source: str | Path, index: str | Path, overrides: tuple[str, ...] = (),
                          folder: str | Path | None = None) -> RagPipeline:
        """Load a transformers RAG checkpoint (hub name such as "facebook/rag-token-nq", or a folder written by
        `RagTokenForGeneration.save_pretrained`) over the index folder `index` (DPR passage vectors). It is
        converted once into `folder` (default: under $RAG_CACHE/models) in this project's format; the resolved
        config records the source, and `save_pretrained` of the result writes this project's format."""
        from rag.transformers_rag import ensure_converted

        return cls.load(ensure_converted(str(source), str(index), folder), (f"index={index}", *overrides))

    @property
    def device(self) -> torch.device:
        return self.model.generator.device

    @property
    def module(self) -> RagModel:
        """The nn.Module a trainer optimises (its forward is the RAG loss, see `LossSettings`)."""
        return self.model

    @property
    def generation(self) -> int:
        """The index folder's generation being served."""
        return self.model.retriever.index.generation

    @property
    def index_folder(self) -> Path:
        return self.model.retriever.index.folder

    def parts(self) -> dict[str, torch.nn.Module]:
        """The trainable parts by name (BERT_d and the index are never trained)."""
        return {"query_encoder": self.model.retriever.encoder, "generator": self.model.generator}

    def info(self) -> dict:
        """What is loaded: models, index folder, generation, passages, device."""
        index = self.model.retriever.index
        return {"query_encoder": self.model.retriever.encoder.cfg.name, "generator": self.cfg.generator.name,
                "adapters": {"query_encoder": self.model.retriever.encoder.cfg.adapter,
                             "generator": self.cfg.generator.adapter},
                "index": str(index.folder), "generation": index.generation, "passages": len(index),
                "index_encoder": index.manifest["encoder"].get("name"), "device": str(self.device),
                "precision": name_of(self.model.generator.compute_dtype),
                "mode": self.cfg.mode, "n_docs": self.cfg.n_docs}

    def save_pretrained(self, folder: str | Path) -> None:
        """BERT_q and the generator, and the RagConfig (rag.yaml). A part with LoRA layers (training with
        lora.rank > 0) is saved as its adapter alone (peft's folder, safetensors) over the base weights rag.yaml
        names; any other part as whole safetensors weights with its tokenizer."""
        folder = Path(folder).expanduser()
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) \
                and not (folder / SAVED_CONFIG).is_file():
            raise BadInput(f"{folder} exists and is not a saved pipeline (no {SAVED_CONFIG}); save into a new or "
                           "empty folder")
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFinite(f"not saving {folder}: {len(bad)} weights are NaN or infinite ({', '.join(bad[:3])}); "
                            "the model diverged")
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Written whole beside the old folder, then swapped in: nothing of an earlier save (an adapter of another
        # run, say) stays beside the new weights, and a failed save leaves the old folder as it was.
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
        try:
            self._save_parts(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if folder.exists():
            old = tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent)
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, folder)

    def _save_parts(self, folder: Path) -> None:
        if self.model.generator.compute_dtype != torch.float32:
            log.warning("saving %s weights: load with precision float32 (or trainable=True) to save full precision",
                        name_of(self.model.generator.compute_dtype))
        cfg = dataclasses.replace(self.cfg, index=str(self.model.retriever.index.folder.resolve()))
        with quiet_bars():
            for name, part in self.parts().items():
                # a DPR encoder is saved whole (its BERT inside), so that AutoModel reads it back as DPR
                whole = part.model if has_adapter(part.model) else part.__dict__.get("whole", part.model)
                whole.save_pretrained(folder / name, safe_serialization=True)
                if has_adapter(part.model):
                    name_base_model(folder / name, getattr(cfg, name).name)
                else:
                    part.tokenizer.save_pretrained(folder / name)
                    # whole weights: any adapter loaded before is merged into them
                    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), adapter=None)})
        save_config(cfg, folder / SAVED_CONFIG)

    def reload_index(self, folder: str | Path | None = None) -> int:
        """Pick up the current generation of the index folder (or switch to another folder) without reloading the
        models; returns the generation. Calls already running finish on the generation they started with."""
        where = IndexFolder(folder or self.cfg.index)
        old = self.model.retriever.index
        index = DenseIndex.load(where, **({"use_gpu": True} if self.cfg.faiss_gpu else {}))
        where.check_encoder(index.manifest, self.model.retriever.encoder.identity())
        if self.cfg.retrieval != "dense":
            index.require_bm25(self.cfg.retrieval)
        if index.manifest["encoder"].get("fingerprint") != old.manifest["encoder"].get("fingerprint"):
            log.warning("%s was built with another document encoder (%s) than the current index (%s)", where.path,
                        index.manifest["encoder"]["name"], old.manifest["encoder"]["name"])
        self.model.retriever.index = index  # one reference swap: atomic for every later call
        self.cfg = dataclasses.replace(self.cfg, index=str(folder) if folder else self.cfg.index)
        return index.generation

    def retrieve(self, questions: list[str] | str, k: int | None = None) -> list[list[Hit]]:
        """The top-k passages of each question, best first (fewer where the index holds fewer)."""
        questions = check_questions(questions)
        k = _positive("k", k, self.cfg.n_docs)
        with torch.inference_mode():
            got = self.model.retriever(questions, k)
        return [[Hit(p.id, p.doc_id, p.title, p.text, float(s), *_found_by(got, b, k))
                 for k, (p, s) in enumerate(zip(ps, scores.tolist(), strict=True)) if p is not None]
                for b, (ps, scores) in enumerate(zip(got.passages, got.doc_scores, strict=True))]

    def passage_texts(self, chunk: int = 50_000) -> Iterator[list[str]]:
        """The texts of every live passage of the index, `chunk` at a time (a stream: the corpus is never joined)."""
        index = self.model.retriever.index
        yield from index.live_texts(chunk)

    def answer(self, question: str, mode: str | None = None, decoding: DecodingConfig | dict | None = None,
               n_docs: int | None = None) -> Answer:
        if not isinstance(question, str):
            raise BadType(f"question must be a string, got {type(question).__name__}")
        return self.answer_batch([question], mode, decoding, n_docs)[0]

    def answer_batch(self, questions: list[str], mode: str | None = None,
                     decoding: DecodingConfig | dict | None = None, n_docs: int | None = None,
                     batch_size: int = 8, passages: list[list] | None = None,
                     context_length: int | None = None) -> list[Answer]:
        """Answer many questions, `batch_size` at a time.

        `passages` (one list per question, all of one length) replaces retrieval: those passages with equal priors
        (None for the question alone: closed-book). `context_length` changes the generator's context limit for this
        call only (e.g. several passages joined into one)."""
        questions = check_questions(questions)
        if passages is not None and len(passages) != len(questions):
            raise BadInput(f"{len(passages)} passage lists for {len(questions)} questions")
        mode = mode or self.cfg.mode
        if mode not in ("sequence", "token"):
            raise BadInput(f"mode must be 'sequence' or 'token', got {mode!r}")
        cfg = self.cfg.decoding if decoding is None else (
            decoding if isinstance(decoding, DecodingConfig) else from_dict(
                DecodingConfig, {**to_dict(self.cfg.decoding), **decoding}, "decoding"))
        n_docs = _positive("n_docs", n_docs, self.cfg.n_docs)
        batch_size = _positive("batch_size", batch_size, 8)
        model = self.model
        if context_length is not None:
            gen = model.generator.with_config(max_context_length=_positive("context_length", context_length, 1))
            model = RagModel(model.retriever, gen, model.prior_scale)
        out = []
        for s in range(0, len(questions), batch_size):
            chunk = questions[s : s + batch_size]
            given = None if passages is None else _given_passages(passages[s : s + batch_size], self.device)
            with torch.inference_mode():
                retrieved, generated = model.generate(chunk, mode, cfg, n_docs, retrieved=given)
            for b, (q, gens) in enumerate(zip(chunk, generated, strict=True)):
                out.append(self._answer_of(q, mode, retrieved, b, gens[0]))
        return out

    def _answer_of(self, question: str, mode: str, retrieved: Retrieved, b: int, g) -> Answer:
        """The Answer of question `b` of a batch from its best generated hypothesis `g` (rag.model.Generated)."""
        passages = tuple(
            Passage(p.id, p.title, p.text, g.doc_scores[k], g.prior[k], g.posterior[k], *_found_by(retrieved, b, k))
            for k, p in enumerate(retrieved.passages[b]) if p is not None
        )
        tok = self.model.generator.tokenizer
        supporting = supporting_passages(g.text, passages)
        token_posteriors = None
        if mode == "token":
            real = [k for k, p in enumerate(retrieved.passages[b]) if p is not None]
            token_posteriors = tuple(tuple(row[k] for k in real) for row in g.token_posteriors)
        return Answer(question=question, text=g.text, score=g.score, mode=mode, passages=passages,
                      tokens=tuple(tok.convert_ids_to_tokens(list(g.tokens))), token_posteriors=token_posteriors,
                      supporting=supporting, support=sum(passages[k].posterior for k in supporting))


def _found_by(retrieved: Retrieved, b: int, k: int) -> tuple[int | None, int | None]:
    """(dense rank, BM25 rank) of passage k of question b, 1-based; None where that side did not find it."""
    if retrieved.ranks is None:
        return None, None
    return tuple(int(r) or None for r in retrieved.ranks[b, k])


def _positive(name: str, value, default: int) -> int:
    """An optional count argument: None takes the default; anything else must be an integer >= 1."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInput(f"{name} must be an integer >= 1, got {value!r}")
    return value


def supporting_passages(answer: str, passages) -> tuple[int, ...]:
    """Positions of the passages whose title or text holds the answer (normalised, as exact match compares).

    The title counts: the generator's prompt shows it, and copying may take the answer from it."""
    if not answer.strip():
        return ()
    return tuple(k for k, p in enumerate(passages) if passage_has_answer(p, [answer]))


def _given_passages(passages: list[list], device) -> Retrieved:
    """Passages chosen by the caller as a retrieval result with equal doc scores (a uniform prior)."""
    import numpy as np

    from rag.retrieval.passages import PassageRecord

    if not all(isinstance(ps, (list, tuple)) for ps in passages):
        raise BadType("passages must be one list per question")
    widths = {len(ps) for ps in passages}
    if len(widths) != 1 or 0 in widths:
        raise BadInput("every question needs the same, non-zero number of passages")
    wrong = next((p for ps in passages for p in ps if p is not None and not isinstance(p, PassageRecord)), None)
    if wrong is not None:
        raise BadType("a given passage must be a rag.retrieval.passages.PassageRecord(id, doc_id, title, text) or "
                      f"None (closed-book), got {type(wrong).__name__}")
    k = widths.pop()
    return Retrieved(np.full((len(passages), k), -1), torch.zeros(len(passages), k, device=device),
                     [list(ps) for ps in passages])
