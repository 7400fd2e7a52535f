"""Tiny random BART models and transformers' own RAG classes over the same weights, for equivalence tests."""

from __future__ import annotations

import torch


def tiny_bart(seed: int = 0, vocab: int = 64, init_std: float = 0.3):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None, no_repeat_ngram_size=0, dropout=0.0, attention_dropout=0.0, init_std=init_std,
    )
    return BartForConditionalGeneration(config).eval()


def hf_rag(bart, kind: str, n_docs: int):
    """`RagTokenForGeneration` or `RagSequenceForGeneration` wrapping `bart` (no retriever: contexts are given)."""
    from transformers import (
        BertConfig,
        BertModel,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenForGeneration,
    )

    qe = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32))
    config = RagConfig.from_question_encoder_generator_configs(
        qe.config, bart.config, n_docs=n_docs, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None,
    )
    cls = RagTokenForGeneration if kind == "token" else RagSequenceForGeneration
    return cls(config=config, question_encoder=qe, generator=bart).eval()


def tiny_tokenizer(vocab: int = 64):
    """A word-level tokenizer over "w3".."w{vocab-1}" with BART's special ids: <s>=0, <pad>=1, </s>=2."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = {"<s>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<pad>")


def tiny_seq2seq_generator(seed: int = 0):
    from rag.config import GeneratorConfig
    from rag.generation.generator import Seq2SeqGenerator

    return Seq2SeqGenerator(tiny_bart(seed), tiny_tokenizer(), GeneratorConfig(name="tiny-bart", family="seq2seq"))


def random_contexts(B: int, K: int, S: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (B * K, S), generator=g)
    mask = torch.ones_like(ids)
    ids[1, -3:] = 1  # one padded context
    mask[1, -3:] = 0
    doc_scores = torch.randn(B, K, generator=g)
    return ids, mask, doc_scores
