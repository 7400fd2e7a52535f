"""Retrieval-augmented generation in the style of RAG-sequence / RAG-token (Lewis et al. 2020).

    from rag import answer, RagPipeline
    answer("Who wrote Pride and Prejudice?")          # the embedded default, loaded (and its index built) once
    pipe = RagPipeline.load("configs/rag/demo.yaml")  # or a save_pretrained folder, or a RagConfig
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait hold a core another process needs (measured: docs/results.md, "Threads
# on a shared machine"). Read by the OpenMP runtime when torch first loads, so it is set here, before any torch
# import of this package; a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["RagPipeline", "answer"]

_default = None


def answer(question: str, **kwargs):
    """Answer `question` with the embedded default pipeline (configs/rag/demo.yaml), loaded on first use."""
    global _default
    if _default is None:
        from rag.first_use import load_pipeline

        _default = load_pipeline()
    return _default.answer(question, **kwargs)


def __getattr__(name: str):
    if name == "RagPipeline":  # imported on first use: `import rag` stays light
        from rag.pipeline import RagPipeline

        return RagPipeline
    raise AttributeError(f"module 'rag' has no attribute {name!r}")
