"""Retrieval-augmented generation in the style of RAG-sequence / RAG-token (Lewis et al. 2020)."""

from __future__ import annotations

__version__ = "0.1.0"

_default = None


def answer(question: str, **kwargs):
    """Answer `question` with the embedded default pipeline (configs/rag/demo.yaml), loaded on first use."""
    global _default
    if _default is None:
        from rag.pipeline import RagPipeline

        _default = RagPipeline.from_config()
    return _default.answer(question, **kwargs)
