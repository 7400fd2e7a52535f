"""LoRA adapters (peft) on BERT_q and the generator in training: added, then saved alone as peft's folder.

Loading merges a saved adapter into the base weights (`rag.weights.merge_adapter`; merged weights no longer require
grad, which made one torch matmul path copy the LM head: docs/results.md, "The fine-tuned default").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from rag.config import ConfigError, LoraSettings
from rag.weights import ADAPTER_CONFIG, quiet_peft

log = logging.getLogger(__name__)


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
    with quiet_peft():
        return get_peft_model(model, cfg)


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
