"""Retrieval-augmented generation in the style of RAG-sequence / RAG-token (Lewis et al. 2020).

    from rag import answer, RagPipeline
    answer("Who wrote Pride and Prejudice?")          # the embedded default, loaded (and its index built) once
    pipe = RagPipeline.load("configs/rag/demo.yaml")  # or a save_pretrained folder, or a RagConfig
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["RagPipeline", "answer"]


def answer(question: str, **kwargs):
    """Answer `question` with the embedded default pipeline (configs/rag/demo.yaml), loaded on first use."""
    from rag.first_use import default_pipeline

    return default_pipeline().answer(question, **kwargs)


def __getattr__(name: str):
    if name == "RagPipeline":  # imported on first use: `import rag` stays light
        from rag.pipeline import RagPipeline

        return RagPipeline
    raise AttributeError(f"module 'rag' has no attribute {name!r}")
