"""The one precision policy: `precision: auto | float32 | bfloat16 | float16` -> the dtype models compute in.

`auto` is bfloat16 where the hardware has bfloat16 matrix units or instructions (a CPU with AMX or AVX512-BF16, a
GPU that supports it) and float32 elsewhere, so a machine without them is never slower than before.

Inference (answering, encoding passages) holds the weights in that dtype: under `torch.autocast` every weight is
cast again at every call, which made a SmolLM2 decoding step slower than float32 (docs/usage.md, "Precision"),
while bfloat16 weights made it faster. Training keeps float32 weights and gets the same precision as accelerate's mixed
precision (`RagPipeline.load(..., trainable=True)`). The numerics that matter stay float32 in the code that calls
the models: pooled vectors, doc scores d(z)ᵀq(x), the log-softmax and logsumexp of the marginals, beam scores.
"""

from __future__ import annotations

import functools
import logging

import torch

from rag.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The dtype to compute in on `device`; `auto` is decided by the hardware and logged once per answer."""
    if name not in ("auto", *DTYPES):
        raise ConfigError(f"precision: {name!r} is not one of auto, float32, bfloat16, float16")
    if name != "auto":
        if name == "float16" and device.type == "cpu":
            raise ConfigError("precision: float16 is for GPUs (CPUs compute it slowly or not at all); use bfloat16 "
                              "or float32 on the CPU")
        return DTYPES[name]
    dtype, why = _auto(device)
    _log_once(device.type, dtype, why)
    return dtype


def _auto(device: torch.device) -> tuple[torch.dtype, str]:
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if ok else torch.float32), f"GPU {'supports' if ok else 'lacks'} bfloat16"
    has = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    if has:
        return torch.bfloat16, f"the CPU has {'+'.join(has)}"
    return torch.float32, "the CPU has neither AMX nor AVX512-BF16"


@functools.lru_cache(maxsize=8)
def _log_once(device: str, dtype: torch.dtype, why: str) -> None:
    log.info("precision auto on %s: %s (%s)", device, str(dtype).removeprefix("torch."), why)


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str | torch.device) -> torch.device:
    """The one device rule: auto is the (first) CUDA GPU when torch sees one, else the CPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but torch sees no CUDA GPU; use device=cpu or auto")
    return device


class Placed:
    """A wrapper of a transformers model (`self.model`) that the one device and precision policy places: BERT_q,
    BERT_d and the generator."""

    def place(self, device: str | torch.device = "auto", precision: str = "auto"):
        """Move to `device`, the weights in the dtype of `precision`; callers take outputs to float32 before any
        log-softmax or pooling."""
        dev = resolve_device(device)
        self.to(device=dev, dtype=resolve_precision(precision, dev))
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
