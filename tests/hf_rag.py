"""Tiny random BART models and transformers' own RAG classes over the same weights, for equivalence tests."""

from __future__ import annotations

import torch


def tiny_bart(seed: int = 0, vocab: int = 64):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
        forced_eos_token_id=None, no_repeat_ngram_size=0, dropout=0.0, attention_dropout=0.0,
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
