"""Retrieval-augmented generation in the style of RAG-sequence / RAG-token (Lewis et al. 2020)."""

__version__ = "0.1.0"
