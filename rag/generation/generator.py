"""Load a generator of the right family (rag/generation/seq2seq.py or causal.py); the interface is base.py's."""

from __future__ import annotations

import torch

from rag.config import GeneratorConfig
from rag.generation.base import Contexts, DecodeState, Generator  # noqa: F401 - importable from here
from rag.generation.causal import CausalGenerator
from rag.generation.seq2seq import Seq2SeqGenerator


def load_generator(cfg: GeneratorConfig) -> Generator:
    """Load `cfg.name` (hub name, folder, or an offline package's GGUF, see rag.weights) as the right family."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from rag.weights import load_causal_lm, loading, resolve

    # an offline package's GGUF first: it is a causal LM, and asking the hub for its config fails offline
    model, tokenizer = load_causal_lm(cfg.name) if cfg.family != "seq2seq" else (None, None)
    seq2seq = False
    if model is None:
        path = resolve(cfg.name)
        with loading("generator.name", cfg.name):
            seq2seq = cfg.family == "seq2seq" or (cfg.family == "auto"
                                                  and AutoConfig.from_pretrained(path).is_encoder_decoder)
            tokenizer = AutoTokenizer.from_pretrained(path)
            auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = auto.from_pretrained(path, dtype=torch.float32)
    if cfg.adapter:
        from rag.weights import merge_adapter

        model = merge_adapter(model, cfg.adapter, "generator.adapter")
    return (Seq2SeqGenerator if seq2seq else CausalGenerator)(model.eval(), tokenizer, cfg)
