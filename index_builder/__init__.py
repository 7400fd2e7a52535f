"""Offline half of RAG: corpus -> overlapping passages -> frozen BERT_d vectors -> FAISS index folder."""

from index_builder.build import BuildError, build

__all__ = ["BuildError", "build"]
