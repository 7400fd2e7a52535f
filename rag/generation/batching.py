"""How context rows run through a generator in batches: length groups (rows of similar length at their own
width), the prefix every row shares (computed once), and the key/value cache under the name the installed
transformers takes."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

LENGTH_SLACK = 0.15  # a row joins a length group when at most this share of its group's width is padding
GROUP_ROWS = 8  # ... or when the group has fewer rows: smaller passes cost more than their padding saves


def length_groups(lengths: torch.Tensor, slack: float = LENGTH_SLACK, min_rows: int = GROUP_ROWS) -> list[torch.Tensor]:
    """Row indices grouped by similar length, longest first: a batch of prompts of 80-210 tokens padded to the
    longest is a quarter padding, and a prompt pass costs per padded token; each group runs at its own width
    (benchmarks/bench_batch.py measures it); one question's rows stay one pass."""
    order = lengths.argsort(descending=True).tolist()
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) < min_rows or lengths[i] >= (1 - slack) * lengths[groups[-1][0]]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return [torch.tensor(g, device=lengths.device) for g in groups]


def shared_prefix(ids: list[list[int]]) -> int:
    """How many leading tokens all rows have in common, leaving every row at least one of its own."""
    n, limit = 0, min(len(x) for x in ids) - 1
    while n < limit and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def by_length(mask: torch.Tensor, run, left: bool) -> list:
    """`run(rows, width)` on each length group of `mask`'s rows (trimmed to the group's width on the padded side);
    `run` returns a list of (tensor, its width dim or None); each tensor comes back padded to the full width on that
    dim (on the left or the right, as the rows are padded), the groups joined and the rows in their first order."""
    width = mask.shape[1]
    groups = length_groups(mask.sum(1), LENGTH_SLACK, GROUP_ROWS)
    if len(groups) == 1:  # one question's rows, most often: no regrouping copies
        return [t for t, _ in run(torch.arange(len(mask), device=mask.device), width)]
    parts = [run(g, int(mask[g].sum(1).max())) for g in groups]
    inverse = torch.cat(groups).argsort()
    out = []
    for j, (_, dim) in enumerate(parts[0]):
        pieces = []
        for part in parts:
            t = part[j][0]
            if dim is not None and t.shape[dim] < width:
                pad = [0, 0] * (t.dim() - 1 - dim) + ([width - t.shape[dim], 0] if left else [0, width - t.shape[dim]])
                t = torch.nn.functional.pad(t, pad)
            pieces.append(t)
        out.append(torch.cat(pieces)[inverse])
    return out



def kv_cache(module: nn.Module, cache) -> dict:
    """The key/value cache as the keyword this transformers takes: `cache` in 5.x, where `past_key_values` is
    deprecated (removal announced for 5.40); only `past_key_values` before."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # a peft model: its base's
    return {_cache_keyword(type(base)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_of(output):
    """The key/value cache a forward pass returned (`cache` in transformers 5.x, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
