"""Reading and writing config files: YAML holding only changes from the defaults, into the frozen dataclasses of
rag/config.py. An unknown key is an error that names it, a value is checked against its annotation and its range
(`within` beside the field), `--set section.key=value` overrides are parsed as YAML scalars, and keys of earlier
releases still load."""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rag.errors import ConfigError

log = logging.getLogger(__name__)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; build nested dataclasses from dicts."""
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads "5e-5" (no dot) as a string
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


# Keys of earlier releases: renamed (new name) or dropped (None), so that their saved configs still load.
LEGACY_KEYS = {("EncoderConfig", "dtype"): "precision", ("TrainConfig", "mixed_precision"): None,
               # extractive decoding (copying with hand-made rules) was removed once the fine-tuned reader answered
               # better without it (docs/results.md, "The fine-tuned default"); old configs and saved models still load
               ("DecodingConfig", "copy"): None, ("DecodingConfig", "max_answer_words"): None,
               ("DecodingConfig", "copy_sentences"): None}


# Allowed ranges of numeric settings (inclusive lower, inclusive upper; None: unbounded). A value outside is an error
# that names the key and the range, never a silent fallback ("n_docs: 0" once meant 5).
def _check_ranges(cls: type, values: dict, where: str) -> None:
    """Each field's range as its `within` says; the cross-checks of a class live in its `cross_check`."""
    import math

    for f in dataclasses.fields(cls):
        if "range" not in f.metadata or values.get(f.name) is None:
            continue
        (low, high), v = f.metadata["range"], values[f.name]
        if isinstance(v, float) and not math.isfinite(v) or (low is not None and v < low) or \
                (high is not None and v > high):
            span = f">= {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{where}.{f.name}: {v!r} is out of range; it must be {span}")
    if hasattr(cls, "cross_check"):
        cls.cross_check(values, where)


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build the frozen dataclass `cls` from a (partial) dict; unknown keys are errors that name them."""
    for (owner, old), new in LEGACY_KEYS.items():
        if owner == cls.__name__ and old in data:
            value = data[old]
            data = {k: v for k, v in data.items() if k != old}
            if new is None and value:
                log.warning("%s.%s=%r is no longer a setting; ignored", where, old, value)
            if new is not None and new not in data:
                data[new] = value
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for k, v in data.items():
        _refuse_unexpanded(v, f"{where}.{k}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    _check_ranges(cls, {**dataclasses.asdict(cls()), **kwargs}, where)  # the defaults take part in cross-checks
    return cls(**kwargs)


def _refuse_unexpanded(value, where: str) -> None:
    """Only ${RAG_CACHE} is expanded in configs (as paths are used); any other ${NAME} would become a folder
    literally named so."""
    if isinstance(value, (list, tuple)):
        for v in value:
            _refuse_unexpanded(v, where)
    elif isinstance(value, str):
        other = [m for m in re.findall(r"\$\{(\w*)\}", value) if m != "RAG_CACHE"]
        if other:
            raise ConfigError(f"{where}: ${{{other[0]}}} is not expanded in configs (only ${{RAG_CACHE}} is); write "
                              "the path out, or let the shell expand it (--set \"key=$HOME/...\")")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML) to a nested dict, returning a new dict."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = out
        for k in keys[:-1]:
            if node.get(k) is None:  # an unset optional section (e.g. query_encoder: the index's own)
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k} is not a section")
        node[keys[-1]] = _value(raw)
    return out


def _value(raw: str) -> Any:
    """A `--set` value as YAML (numbers, lists, null), or the text itself where it is no YAML value: a prompt like
    "Passage: {text}" used to stop the program with a YAML scanner traceback."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load `cls` from an optional YAML file of changes plus `--set` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = apply_overrides(data, overrides)
    return from_dict(cls, data, where=str(path) if path else "config")


SAVED_CONFIG = "rag.yaml"  # beside query_encoder/ and generator/ in a save_pretrained folder


def save_config(cfg: Any, path: str | Path) -> None:
    from rag.files import writing

    with writing(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
