"""transformers' RAG checkpoints and precomputed passage embeddings, brought in and checked against transformers.

A tiny random RagTokenForGeneration / RagSequenceForGeneration (DPR + BART with a handful of layers) saved with
save_pretrained, and a tiny `datasets` dataset with an embeddings column whose FAISS index transformers' own
CustomHFIndex reads. The project imports the dataset (`index_builder import`), converts the checkpoint
(`RagPipeline.from_transformers`), and must retrieve the same ids with the same doc scores and generate the same
tokens as transformers' `generate` with its retriever: greedy and beam, both modes.
"""

import random

import numpy as np
import pytest
import torch

from tests.hf_rag import tiny_bart, tiny_tokenizer

DIM = 32
WORDS = [f"w{i}" for i in range(3, 64)]


def question_tokenizer(folder):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast.from_pretrained(folder)  # reads vocab.txt (the constructor's vocab_file does not)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import faiss
    from datasets import Dataset
    from transformers import (
        DPRConfig,
        DPRQuestionEncoder,
        RagConfig,
        RagSequenceForGeneration,
        RagTokenForGeneration,
        RagTokenizer,
    )

    root = tmp_path_factory.mktemp("hf-rag")
    rng = random.Random(0)
    docs = {"id": [f"doc{i}" for i in range(12)],
            "title": [" ".join(rng.choices(WORDS, k=2)) for _ in range(12)],
            "text": [" ".join(rng.choices(WORDS, k=12)) for _ in range(12)]}
    docs["embeddings"] = np.random.default_rng(0).normal(size=(12, DIM)).astype(np.float32).tolist()
    passages = root / "passages"
    ds = Dataset.from_dict(docs)
    ds.save_to_disk(str(passages))
    ds.add_faiss_index("embeddings", custom_index=faiss.IndexFlatIP(DIM))
    index_path = root / "hf.faiss"
    ds.get_index("embeddings").save(str(index_path))

    q_tok = question_tokenizer(root / "qtok")
    torch.manual_seed(0)
    dpr = DPRQuestionEncoder(DPRConfig(vocab_size=len(q_tok), hidden_size=DIM, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
    bart = tiny_bart(seed=1)
    models = {}
    for mode, cls in (("token", RagTokenForGeneration), ("sequence", RagSequenceForGeneration)):
        config = RagConfig.from_question_encoder_generator_configs(
            dpr.config, bart.config, n_docs=3, bos_token_id=0, pad_token_id=1, eos_token_id=2,
            decoder_start_token_id=2, forced_bos_token_id=None, forced_eos_token_id=None, index_name="custom",
            passages_path=str(passages), index_path=str(index_path), max_combined_length=64)
        folder = root / f"rag-{mode}"
        cls(config=config, question_encoder=dpr, generator=bart).save_pretrained(folder)
        RagTokenizer(question_encoder=q_tok, generator=tiny_tokenizer()).save_pretrained(folder)
        models[mode] = folder
    return root, passages, models


@pytest.fixture(scope="module")
def imported(setup):
    from index_builder.importer import import_index
    from rag.config import BuildConfig, load_config

    root, passages, _ = setup
    return import_index(load_config(BuildConfig, None, [
        f"output={root / 'index'}", "corpus.format=hf_disk", f"corpus.path={passages}", "encoder.name=tiny-dpr-ctx",
        "encoder.pooling=cls", "encoder.normalize=false", "index.shard_size=5"]), progress=False)


def hf_model(folder, mode):
    from transformers import RagRetriever, RagSequenceForGeneration, RagTokenForGeneration

    retriever = RagRetriever.from_pretrained(str(folder))
    cls = RagTokenForGeneration if mode == "token" else RagSequenceForGeneration
    return cls.from_pretrained(str(folder), retriever=retriever).eval(), retriever


QUESTIONS = ["w7 w8 w9", "w20 w33", "w41 w5 w12 w60"]


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_same_retrieval_and_generation_as_transformers(setup, imported, mode, tmp_path):
    from rag.pipeline import RagPipeline

    _, passages, models = setup
    hf, retriever = hf_model(models[mode], mode)
    pipe = RagPipeline.from_transformers(models[mode], imported, ("precision=float32",), folder=tmp_path / "conv")
    assert pipe.cfg.mode == mode and pipe.cfg.n_docs == 3 and "transformers:" in pipe.cfg.source
    q_tok = retriever.question_encoder_tokenizer
    ids = [retriever.index.dataset[int(i)]["id"] for i in range(12)]
    for q in QUESTIONS:
        enc = q_tok([q], return_tensors="pt")
        assert q_tok.unk_token_id not in enc["input_ids"][0].tolist()
        with torch.no_grad():
            q_vec = hf.question_encoder(enc["input_ids"], attention_mask=enc["attention_mask"])[0]
        doc_vecs, doc_ids, _ = retriever.retrieve(q_vec.numpy(), n_docs=3)
        hf_scores = torch.bmm(q_vec[:, None], torch.from_numpy(doc_vecs).float().transpose(1, 2))[:, 0]
        hits = pipe.retrieve(q, 3)[0]
        assert [h.id for h in hits] == [ids[int(i)] for i in doc_ids[0]]
        assert np.allclose([h.score for h in hits], hf_scores[0].numpy(), atol=1e-4)
        for beams in (1, 2):
            with torch.no_grad():
                out = hf.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], n_docs=3,
                                  num_beams=beams, max_length=6, min_new_tokens=5, num_return_sequences=1)
            theirs = [t for t in out[0].tolist()[1:] if t not in (1, 2)]
            ans = pipe.answer(q, decoding={"num_beams": beams, "max_new_tokens": 5, "min_new_tokens": 5})
            ours = pipe.model.generator.tokenizer.convert_tokens_to_ids(list(ans.tokens))
            assert [t for t in ours if t not in (1, 2)] == theirs, (q, beams)


def test_the_converted_model_saves_in_the_project_format(setup, imported, tmp_path):
    from rag.pipeline import RagPipeline

    pipe = RagPipeline.from_transformers(setup[2]["token"], imported, ("precision=float32",),
                                         folder=tmp_path / "conv")
    pipe.save_pretrained(tmp_path / "mine")
    again = RagPipeline.load(tmp_path / "mine")
    assert again.answer(QUESTIONS[0]).text == pipe.answer(QUESTIONS[0]).text
    assert {p.name for p in (tmp_path / "mine" / "generator").iterdir()} >= {"model.safetensors", "config.json"}


def test_import_keeps_ids_and_texts_and_resumes(setup, imported, tmp_path):
    from datasets import load_from_disk

    from rag.retrieval.index import DenseIndex

    ds = load_from_disk(str(setup[1]))
    index = DenseIndex.load(imported)
    assert index.store.column("id") == ds["id"] and index.store.column("text") == ds["text"]
    assert np.allclose(np.asarray(index.vectors), np.asarray(ds["embeddings"], np.float32))
    m = index.manifest
    assert m["encoder"]["name"] == "tiny-dpr-ctx" and m["encoder"]["fingerprint"] == "imported"
    assert m["build"]["passages_written"] == 12


@pytest.mark.parametrize("fmt", ["arrow", "parquet", "npy"])
def test_import_from_arrow_parquet_and_npy(setup, tmp_path, fmt):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import load_from_disk

    from index_builder.importer import import_index
    from rag.config import BuildConfig, load_config
    from rag.retrieval.index import DenseIndex

    ds = load_from_disk(str(setup[1]))
    table = ds.data.table
    extra = []
    if fmt == "arrow":
        path = tmp_path / "p.arrow"
        with pa.ipc.new_file(str(path), table.schema) as w:
            w.write_table(table)
    elif fmt == "parquet":
        path = tmp_path / "parts"
        path.mkdir()
        pq.write_table(table.slice(0, 7), path / "a.parquet")
        pq.write_table(table.slice(7), path / "b.parquet")
    else:
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps({"id": r["id"], "title": r["title"], "text": r["text"]}) + "\n"
                                for r in ds))
        (tmp_path / "vecs").mkdir()
        vecs = np.asarray(ds["embeddings"], np.float32)
        np.save(tmp_path / "vecs" / "0.npy", vecs[:5])
        np.save(tmp_path / "vecs" / "1.npy", vecs[5:])
        extra = [f"corpus.vectors={tmp_path / 'vecs'}"]
    out = import_index(load_config(BuildConfig, None, [f"output={tmp_path / 'idx'}", f"corpus.format={fmt}",
                                                       f"corpus.path={path}", "encoder.name=tiny-dpr-ctx",
                                                       "encoder.pooling=cls", "encoder.normalize=false",
                                                       "index.shard_size=4", *extra]), progress=False)
    index = DenseIndex.load(out)
    assert index.store.column("id") == ds["id"]
    assert np.allclose(np.asarray(index.vectors), np.asarray(ds["embeddings"], np.float32))


def test_wrong_inputs_are_one_line(setup, tmp_path, tiny_bert, capsys):
    from datasets import Dataset

    from index_builder.__main__ import main as builder
    from rag.config import ConfigError
    from rag.pipeline import RagPipeline

    bad = tmp_path / "no-emb"
    Dataset.from_dict({"id": ["a"], "title": ["t"], "text": ["x"]}).save_to_disk(str(bad))
    capsys.readouterr()  # datasets' own progress bar
    assert builder(["import", "--set", f"output={tmp_path / 'o'}", "--set", "corpus.format=hf_disk", "--set",
                    f"corpus.path={bad}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no column 'embeddings'" in err and "\n" not in err.strip()
    assert builder(["import", "--set", f"output={tmp_path / 'o2'}", "--set", "corpus.format=jsonl", "--quiet"]) == 2
    assert "cannot be imported" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a transformers RAG model"):
        RagPipeline.from_transformers(tiny_bert, tmp_path, folder=tmp_path / "conv")
    # an index of another dimension than the checkpoint's question encoder
    from index_builder.importer import import_index
    from rag.config import BuildConfig, load_config

    other = tmp_path / "dim16"
    Dataset.from_dict({"id": ["a", "b"], "title": ["t", "u"], "text": ["x", "y"],
                       "embeddings": np.ones((2, 16), np.float32).tolist()}).save_to_disk(str(other))
    index = import_index(load_config(BuildConfig, None, [f"output={tmp_path / 'i16'}", "corpus.format=hf_disk",
                                                         f"corpus.path={other}", "encoder.pooling=cls",
                                                         "encoder.normalize=false"]), progress=False)
    from rag.retrieval.index_folder import EncoderMismatch

    with pytest.raises(EncoderMismatch, match="dim: index has 16, encoder has 32"):
        RagPipeline.from_transformers(setup[2]["token"], index, ("precision=float32",), folder=tmp_path / "c2")


def test_a_config_naming_a_transformers_checkpoint(setup, imported, tmp_path, monkeypatch):
    """configs/rag/rag-token-nq.yaml's way: `source: transformers:NAME` converts once into $RAG_CACHE/models."""
    from rag.config import RagConfig, load_config, resolve_config_path
    from rag.pipeline import RagPipeline

    for name in ("rag/rag-token-nq.yaml", "rag/rag-sequence-nq.yaml"):
        cfg = load_config(RagConfig, resolve_config_path(name))
        assert cfg.source.startswith("transformers:facebook/") and cfg.n_docs == 10
    monkeypatch.setenv("RAG_CACHE", str(tmp_path / "cache"))
    yaml = tmp_path / "rag.yaml"
    yaml.write_text(f"source: transformers:{setup[2]['sequence']}\nindex: {imported}\nn_docs: 2\nprecision: float32\n")
    pipe = RagPipeline.load(yaml)
    assert (pipe.cfg.mode, pipe.cfg.n_docs) == ("sequence", 2) and len(pipe.answer(QUESTIONS[0]).passages) == 2
    assert any((tmp_path / "cache" / "models").iterdir())


def test_a_killed_import_keeps_the_rows_it_wrote(setup, tmp_path, monkeypatch):
    """Killed while writing vectors: the rerun writes only the rows after the last recorded block, straight into
    the one vectors file (no shards, no merge), and the folder equals an uninterrupted import's."""
    import index_builder.importer as importer
    from rag.config import BuildConfig, load_config
    from rag.files import NpyRows
    from rag.retrieval.index import DenseIndex

    def config(name):
        return load_config(BuildConfig, None, [f"output={tmp_path / name}", "corpus.format=hf_disk",
                                               f"corpus.path={setup[1]}", "encoder.pooling=cls",
                                               "encoder.normalize=false", "index.shard_size=5"])

    monkeypatch.setattr(importer, "BATCH", 4)  # 12 rows in batches of 4: progress recorded after rows 8 and 12
    real, writes = NpyRows.write, []

    def write(self, start, block):
        writes.append((start, len(block)))
        if len(writes) == 3:
            raise KeyboardInterrupt
        real(self, start, block)

    monkeypatch.setattr(NpyRows, "write", write)
    with pytest.raises(KeyboardInterrupt):
        importer.import_index(config("idx"), progress=False)
    assert not (tmp_path / "idx" / "shards").exists() and (tmp_path / "idx" / "vectors.partial.npy").is_file()
    writes.clear()
    importer.import_index(config("idx"), progress=False)
    assert writes == [(8, 4)]  # rows 0-7 were written and recorded before the kill
    monkeypatch.undo()
    importer.import_index(config("whole"), progress=False)
    a, b = DenseIndex.load(tmp_path / "idx", verify=True), DenseIndex.load(tmp_path / "whole")
    assert np.array_equal(np.asarray(a.vectors), np.asarray(b.vectors)) and len(a) == 12
    q = np.asarray(b.vectors[:3], np.float32)
    assert np.array_equal(a.search(q, 5).ids, b.search(q, 5).ids)
