"""Shared helpers for the benchmarks: the machine's matmul rate, peak memory, and table printing."""

from __future__ import annotations

import platform
import time

import numpy as np


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of a square torch matmul on this machine (the scale every benchmark is read against)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def table(rows: list[dict], floatfmt: str = "{:.3g}") -> str:
    """A markdown table from a list of dicts with the same keys."""
    keys = list(rows[0])
    fmt = lambda v: floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
