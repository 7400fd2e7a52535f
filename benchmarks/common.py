"""Shared helpers for the benchmarks: the machine's matmul rate, peak memory, and table printing."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

NQ_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "qa" / "nq-open.dev.jsonl"  # ../shared/data/qa


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
    """The CPU by name, its cores, and whether it has bfloat16 matrix units (AMX) or instructions (AVX512-BF16):
    figures are only comparable between runs on the same kind."""
    import os

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, {'+'.join(bf16) or 'no bf16 units'}"


def run_module(module: str, args: list[str]) -> tuple[float, float, str]:
    """`python -m module args` in a fresh process: its wall seconds, its own peak resident memory (MiB, the child's
    VmHWM as it exits: getrusage's ru_maxrss would include the RSS of the parent it was forked from) and its
    stdout."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            "try:\n"
            f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "finally:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
            "    print(f'PEAK_KIB {hwm}', file=sys.stderr)\n")
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if run.returncode:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed: {run.stderr[-2000:]}")
    peak = next(int(line.split()[1]) for line in run.stderr.splitlines() if line.startswith("PEAK_KIB "))
    return seconds, peak / 1024, run.stdout


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


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's true top k (rows of `truth`, best first) among its first k found ids."""
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth, strict=True)]))
