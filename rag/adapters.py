"""LoRA adapters (peft) on BERT_q and the generator: added for training, saved alone, merged at load.

A saved adapter is peft's own folder (adapter_config.json + adapter_model.safetensors, no pickle); loading merges
it into the base weights, so the model keeps the base's classes, shapes, dtype and speed (merged weights no longer
require grad, which made one torch matmul path copy the LM head: docs/results.md, "The fine-tuned default").
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

from torch import nn

from rag.config import ConfigError, LoraSettings, resolve_config_path
from rag.weights import expand_path, refuse_pickle

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"  # peft's name; its presence marks a folder as an adapter


def adapter_folder(path: str | Path, key: str) -> Path:
    """The folder an `adapter:` setting names: a path as given, else one shipped with the package."""
    folder = resolve_config_path(expand_path(path))
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{key}={str(path)!r}: no {ADAPTER_CONFIG} there; give a folder written by training "
                          "with lora.rank > 0 (or by peft's save_pretrained)")
    refuse_pickle(folder, key)
    return folder


def merge_adapter(model: nn.Module, path: str | Path, key: str) -> nn.Module:
    """`model` with the LoRA adapter at `path` merged into its weights (a plain transformers model again)."""
    from peft import PeftModel

    folder = adapter_folder(path, key)
    try:
        with _quiet():
            config = _lora_config(folder)
            merged = PeftModel.from_pretrained(model, str(folder), config=config).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}={str(path)!r} does not fit this model ({first}); was it trained on "
                          "another base model?") from None
    log.info("merged the adapter %s", folder)
    return merged


def _lora_config(folder: Path):
    """The adapter's LoraConfig from the keys this peft knows: a config saved by a newer peft (the shipped adapters)
    loads on the oldest supported one without a warning about keys it ignores anyway."""
    import dataclasses

    from peft import LoraConfig

    record = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return LoraConfig(**{k: v for k, v in record.items() if k in known})


def add_lora(model: nn.Module, settings: LoraSettings, modules: tuple[str, ...], key: str) -> nn.Module:
    """`model` wrapped with fresh LoRA layers on `modules` (only they train); `save_pretrained` then writes
    only the adapter."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in modules if m not in names]
    if missing:
        raise ConfigError(f"lora.{key}_modules: {', '.join(missing)} not in {type(model).__name__}; its linear "
                          f"layers include {', '.join(sorted(_linear_names(model))[:12])}")
    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                     target_modules=list(modules))
    with _quiet():
        return get_peft_model(model, cfg)


@contextlib.contextmanager
def _quiet():
    """peft asks transformers a deprecated question (a FutureWarning); nothing for a user to do about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def name_base_model(folder: Path, name: str) -> None:
    """Record the configured base model (a hub name) in a saved adapter instead of the local path peft wrote."""
    path = folder / ADAPTER_CONFIG
    record = json.loads(path.read_text(encoding="utf-8"))
    record["base_model_name_or_path"] = name
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def has_adapter(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _linear_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
