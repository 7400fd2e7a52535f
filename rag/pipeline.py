"""The public face: `RagPipeline.answer(question)` -> an `Answer` with its provenance."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rag.config import DecodingConfig, RagConfig, apply_overrides, from_dict, load_config, save_config, to_dict
from rag.encoders import Encoder
from rag.generator import load_generator
from rag.index import DenseIndex
from rag.metrics import passage_has_answer
from rag.model import RagModel
from rag.retriever import Retrieved, Retriever, check_questions

log = logging.getLogger(__name__)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str
    score: float  # d(z)ᵀq(x)
    prior: float  # p(z|x)
    posterior: float  # p(z|x,y): how much this passage supports the answer


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    score: float
    mode: str
    passages: tuple[Passage, ...]
    tokens: tuple[str, ...] = ()
    # RAG-token: (T, K) p(z | x, y_1..t) per answer token, so a person can see which passage produced which word
    token_posteriors: tuple[tuple[float, ...], ...] | None = None
    # Indices of the passages that contain the answer (normalised, whole words), and their posterior mass.
    supporting: tuple[int, ...] = ()
    support: float = 0.0

    @property
    def supported(self) -> bool:
        """Whether the retrieved passages back the answer: it occurs in a passage that holds at least
        `SUPPORT_MIN` of the posterior. Otherwise the answer is the generator's guess, not read from a passage."""
        return bool(self.supporting) and self.support >= SUPPORT_MIN


SUPPORT_MIN = 0.2  # posterior mass; with k=5 a fifth is what one passage holds under a uniform posterior


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, else relative to the repository's configs/ folder."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for candidate in (REPO_CONFIGS.parent / p, REPO_CONFIGS / p):
        if candidate.is_file():
            return candidate
    return p


class RagPipeline:
    def __init__(self, model: RagModel, cfg: RagConfig):
        self.model = model
        self.cfg = cfg

    @classmethod
    def from_config(cls, config: str | Path | RagConfig | None = None, overrides: tuple[str, ...] = ()) -> RagPipeline:
        """Load from a YAML file (default: configs/rag/demo.yaml), a `RagConfig`, or the defaults."""
        if isinstance(config, RagConfig):
            cfg = from_dict(RagConfig, apply_overrides(to_dict(config), overrides))
        else:
            path = resolve_config_path(config or "rag/demo.yaml")
            cfg = load_config(RagConfig, path if path.is_file() or config else None, overrides)
        return cls.from_parts(cfg)

    @classmethod
    def from_parts(cls, cfg: RagConfig) -> RagPipeline:
        from rag.index import IndexFolderError

        folder = Path(cfg.index).expanduser()
        if not (folder / "manifest.json").is_file() and cfg.build:
            _build_index(cfg)
        index = DenseIndex.load(folder)
        built = index.manifest["encoder"]
        for key in ("pooling", "normalize"):
            if getattr(cfg.query_encoder, key) != built[key]:
                raise IndexFolderError(
                    f"{folder}: the index was built with {key}={built[key]!r} but query_encoder.{key} is "
                    f"{getattr(cfg.query_encoder, key)!r}; BERT_q must pool like BERT_d")
        encoder = Encoder.from_config(cfg.query_encoder)
        generator = load_generator(cfg.generator)
        return cls(RagModel(Retriever(encoder, index), generator), cfg)

    @classmethod
    def from_pretrained(cls, folder: str | Path, overrides: tuple[str, ...] = ()) -> RagPipeline:
        """Load a folder written by `save_pretrained` (safetensors weights + rag.yaml)."""
        folder = Path(folder).expanduser()
        if not (folder / "rag.yaml").is_file():
            raise FileNotFoundError(f"{folder} has no rag.yaml; it was not written by RagPipeline.save_pretrained")
        return cls.from_parts(load_config(RagConfig, folder / "rag.yaml", (
            f"query_encoder.name={folder / 'query_encoder'}", f"generator.name={folder / 'generator'}",
            *overrides)))

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in (("query_encoder", self.model.retriever.encoder), ("generator", self.model.generator)):
            part.model.save_pretrained(folder / name, safe_serialization=True)
            part.tokenizer.save_pretrained(folder / name)
        cfg = dataclasses.replace(self.cfg, index=str(Path(self.cfg.index).expanduser().resolve()))
        save_config(cfg, folder / "rag.yaml")

    def reload_index(self, folder: str | Path | None = None) -> int:
        """Pick up the current generation of the index folder (or switch to another folder) without reloading the
        models; returns the generation. Calls already running finish on the generation they started with."""
        folder = Path(folder or self.cfg.index).expanduser()
        old = self.model.retriever.index
        index = DenseIndex.load(folder)
        if index.manifest["encoder"].get("fingerprint") != old.manifest["encoder"].get("fingerprint"):
            log.warning("%s was built with another document encoder (%s) than the current index (%s)", folder,
                        index.manifest["encoder"]["name"], old.manifest["encoder"]["name"])
        self.model.retriever.index = index  # one reference swap: atomic for every later call
        self.cfg = dataclasses.replace(self.cfg, index=str(folder))
        return index.generation

    def answer(self, question: str, mode: str | None = None, decoding: DecodingConfig | dict | None = None,
               n_docs: int | None = None) -> Answer:
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        return self.answer_batch([question], mode, decoding, n_docs)[0]

    def answer_batch(self, questions: list[str], mode: str | None = None,
                     decoding: DecodingConfig | dict | None = None, n_docs: int | None = None,
                     batch_size: int = 8, passages: list[list] | None = None) -> list[Answer]:
        """Answer many questions, `batch_size` at a time. `passages` (one list per question, all of one length)
        replaces retrieval: those passages with equal priors (None for the question alone: closed-book)."""
        questions = check_questions(questions)
        if passages is not None and len(passages) != len(questions):
            raise ValueError(f"{len(passages)} passage lists for {len(questions)} questions")
        mode = mode or self.cfg.mode
        if mode not in ("sequence", "token"):
            raise ValueError(f"mode must be 'sequence' or 'token', got {mode!r}")
        cfg = self.cfg.decoding if decoding is None else (
            decoding if isinstance(decoding, DecodingConfig) else from_dict(
                DecodingConfig, {**to_dict(self.cfg.decoding), **decoding}, "decoding"))
        n_docs = n_docs or self.cfg.n_docs
        out = []
        for s in range(0, len(questions), batch_size):
            chunk = questions[s : s + batch_size]
            given = None if passages is None else _given(passages[s : s + batch_size], self.model.generator.device)
            with torch.inference_mode():
                retrieved, generated = self.model.generate(chunk, mode, cfg, n_docs, retrieved=given)
            for b, (q, gens) in enumerate(zip(chunk, generated, strict=True)):
                out.append(self._answer(q, mode, retrieved, b, gens[0]))
        return out

    def _answer(self, question, mode, retrieved, b, g) -> Answer:
        passages = tuple(
            Passage(p.id, p.title, p.text, g.doc_scores[k], g.prior[k], g.posterior[k])
            for k, p in enumerate(retrieved.passages[b]) if p is not None
        )
        tok = self.model.generator.tokenizer
        supporting = supporting_passages(g.text, passages)
        return Answer(question=question, text=g.text, score=g.score, mode=mode, passages=passages,
                      tokens=tuple(tok.convert_ids_to_tokens(list(g.tokens))),
                      token_posteriors=g.token_posteriors if mode == "token" else None,
                      supporting=supporting, support=sum(passages[k].posterior for k in supporting))


def supporting_passages(answer: str, passages) -> tuple[int, ...]:
    """Positions of the passages whose title or text holds the answer (normalised, as exact match compares).

    The title counts: the generator's prompt shows it, and copying may take the answer from it."""
    if not answer.strip():
        return ()
    return tuple(k for k, p in enumerate(passages) if passage_has_answer(p, [answer]))


def _given(passages: list[list], device) -> Retrieved:
    """Passages chosen by the caller as a retrieval result with equal doc scores (a uniform prior)."""
    import numpy as np

    widths = {len(ps) for ps in passages}
    if len(widths) != 1 or 0 in widths:
        raise ValueError("every question needs the same, non-zero number of passages")
    k = widths.pop()
    return Retrieved(np.full((len(passages), k), -1), torch.zeros(len(passages), k, device=device),
                     [list(ps) for ps in passages])


def _build_index(cfg: RagConfig) -> None:
    """First use of a config whose index is missing: build it from `cfg.build` (an index config)."""
    from index_builder.build import build  # the builder sits above rag; imported only on this path
    from rag.config import BuildConfig

    path = resolve_config_path(cfg.build)
    log.warning("index %s not found: building it from %s (once; later runs load it)", cfg.index, path)
    build(load_config(BuildConfig, path, [f"output={cfg.index}"]), progress=True)
