"""Training checkpoints without pickle: safetensors for tensors, JSON for everything else.

accelerate's `save_state` / `load_state` pickle the optimiser, the RNG states and registered objects, and
unpickling a crafted checkpoint runs its code. Here every file is data: a checkpoint folder holds

    trainable.safetensors              the parameters that train (a frozen generator is not saved again)
    optimizer.safetensors, .json       the optimiser's per-parameter tensors; its hyper-parameters
    scheduler.json, progress.json      the LR schedule's counters; the step and the best dev score
    rng-R.safetensors, rng-R.json      torch (CPU and CUDA) and Python / numpy RNG states of process R
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rag.errors import RagError
from rag.files import parse_json

FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "progress.json")


class CheckpointError(RagError):
    pass


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save(folder: Path, model, optimizer, scheduler, progress: dict, main: bool, rank: int) -> None:
    """Write this process's part of a checkpoint into `folder` (the main process writes the shared files)."""
    folder.mkdir(parents=True, exist_ok=True)
    if main:
        save_file({n: p.detach().contiguous().cpu() for n, p in trainable(model).items()},
                  folder / "trainable.safetensors")
        state = optimizer.state_dict()
        tensors, plain = {}, {}
        for i, values in state["state"].items():
            for k, v in values.items():
                if torch.is_tensor(v):
                    tensors[f"{i}.{k}"] = v.detach().contiguous().cpu()
                else:
                    plain[f"{i}.{k}"] = v
        save_file(tensors, folder / "optimizer.safetensors")
        _write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "plain": plain})
        _write_json(folder / "scheduler.json", scheduler.state_dict())
        _write_json(folder / "progress.json", progress)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, folder / f"rng-{rank}.safetensors")
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    _write_json(folder / f"rng-{rank}.json", {"python": _jsonable(random.getstate()),
                                              "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]})


def load(folder: Path, model, optimizer, scheduler, rank: int) -> dict:
    """Restore a checkpoint written by `save` into the prepared objects; returns the progress record. A missing,
    truncated or mismatched file is a CheckpointError naming it."""
    for name in FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: not a whole checkpoint; resume from another")
    weights = _read_tensors(folder / "trainable.safetensors")
    params = trainable(model)
    if set(weights) != set(params):
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        raise CheckpointError(f"{folder / 'trainable.safetensors'} does not match the parts this config trains "
                              f"(unexpected {extra[:3]}, missing {missing[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            if weights[n].shape != p.shape:
                raise CheckpointError(f"{folder / 'trainable.safetensors'}: {n} has shape "
                                      f"{tuple(weights[n].shape)}, the model {tuple(p.shape)}")
            p.copy_(weights[n])
    tensors = _read_tensors(folder / "optimizer.safetensors")
    meta = _read_json(folder / "optimizer.json")
    state: dict[int, dict] = {}
    for key, v in [*tensors.items(), *meta["plain"].items()]:
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        scheduler.load_state_dict(_read_json(folder / "scheduler.json"))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: the optimiser or scheduler state does not fit this run ({e})") from None
    rng_file = folder / f"rng-{rank}.safetensors"
    if rng_file.is_file():  # a run resumed on more processes than it was saved from starts their RNGs afresh
        rng = _read_tensors(rng_file)
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        plain = _read_json(folder / f"rng-{rank}.json")
        version, internal, gauss = plain["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return _read_json(folder / "progress.json")


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def _read_json(path: Path):
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); the checkpoint is damaged, resume from another") \
            from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path} cannot be read ({e}); the checkpoint is damaged, resume from another") \
            from None
