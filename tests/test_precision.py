"""The precision knob: auto from the hardware, bfloat16 and float32 paths agreeing within stated tolerances."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rag import precision
from rag.config import ConfigError
from rag.pipeline import RagPipeline
from tests.conftest import rag_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, expected", [
    ({"avx512f", "amx_bf16", "avx512_bf16"}, torch.bfloat16),  # Intel Xeon with AMX
    ({"avx512f", "avx512_bf16"}, torch.bfloat16),  # AMD EPYC (Zen 4)
    ({"avx2", "fma"}, torch.float32),  # no bfloat16 units: never slower than before
    (set(), torch.float32),
])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.resolve_precision("auto", CPU) == expected


def test_auto_on_a_gpu_and_the_explicit_choices(monkeypatch):
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.resolve_precision("auto", torch.device("cuda")) == expected
    assert precision.resolve_precision("float32", CPU) == torch.float32
    assert precision.resolve_precision("bfloat16", CPU) == torch.bfloat16
    assert precision.resolve_precision("float16", torch.device("cuda")) == torch.float16
    with pytest.raises(ConfigError, match="float16 is for GPUs"):
        precision.resolve_precision("float16", CPU)
    with pytest.raises(ConfigError, match="not one of"):
        precision.resolve_precision("fp8", CPU)


@pytest.fixture(scope="module")
def pipes(tiny_index, tiny_bert, tiny_lms):
    """The same tiny pipeline in float32 and in bfloat16 (BERT_q and the generator share the weights' values)."""
    return {name: RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms["llama"], precision=name))
            for name in ("float32", "bfloat16")}


def test_the_pipeline_computes_in_its_precision(pipes, tiny_index, tiny_bert, tiny_lms):
    assert pipes["bfloat16"].info()["precision"] == "bfloat16" and pipes["float32"].info()["precision"] == "float32"
    for name, pipe in pipes.items():  # inference holds the weights in the compute dtype
        assert {p.dtype for p in pipe.model.parameters()} == {precision.DTYPES[name]}
    trainable = RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms["llama"], precision="bfloat16"),
                                 trainable=True)
    assert {p.dtype for p in trainable.model.parameters()} == {torch.float32}  # mixed precision trains fp32 weights
    assert trainable.cfg.precision == "bfloat16"  # and serves as configured once saved


def test_doc_scores_agree_and_stay_float32(pipes):
    """Doc scores d(z)ᵀq(x) within 2e-2 of float32 (cosines of unit vectors), computed in float32."""
    questions = ["capital of france", "who wrote the novel", "the moon rocket", "ocean whale"]
    got = {}
    for name, pipe in pipes.items():
        with torch.no_grad():
            r = pipe.model.retriever(questions, 3)
        assert r.doc_scores.dtype == torch.float32
        got[name] = r
    assert np.array_equal(got["float32"].ids[:, 0], got["bfloat16"].ids[:, 0])  # the same best passage
    same = got["float32"].ids == got["bfloat16"].ids
    diff = (got["float32"].doc_scores - got["bfloat16"].doc_scores).abs()[torch.from_numpy(same)]
    assert diff.max() < 2e-2, diff.max()


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_losses_agree(pipes, mode):
    """The RAG losses within 2 % of float32: the marginal's log-softmax and logsumexp run in float32."""
    questions, answers = ["capital of france", "who wrote the novel"], ["paris", "austen"]
    with torch.no_grad():
        loss = {name: p.model.loss(questions, answers, mode=mode, n_docs=3) for name, p in pipes.items()}
    assert loss["bfloat16"].dtype == torch.float32
    assert torch.allclose(loss["bfloat16"], loss["float32"], rtol=2e-2), loss


def test_greedy_tokens_agree_where_the_margins_are_wide(tiny_lms):
    """A tiny generator taught three answers (so that its next-token margins are wide, as a trained reader's are)
    decodes the same greedy tokens in bfloat16 as in float32. A random one is no test: its margins (~0.1) are
    of the size of bfloat16's logit error (~0.06)."""
    from rag.config import DecodingConfig, GeneratorConfig
    from rag.generation import decoding
    from rag.generation.generator import load_generator
    from rag.generation.marginal import doc_logprobs
    from rag.retrieval.passages import PassageRecord

    torch.manual_seed(0)
    gen = load_generator(GeneratorConfig(name=str(tiny_lms["llama"]), max_target_length=8))
    questions = ["capital of france", "who wrote the novel", "the moon rocket"]
    answers = ["paris", "austen wrote it", "apollo"]
    passages = [[PassageRecord(id=f"{i}", doc_id=f"{i}", title=a, text=f"{q} : {a} is the answer") for i in range(2)]
                for q, a in zip(questions, answers, strict=True)]
    K = 2
    targets, mask = gen.target_ids(answers)  # (B, T)
    optimizer = torch.optim.Adam(gen.parameters(), lr=1e-2)
    for _ in range(60):
        ctx = gen.prepare(questions, passages)
        lp, _, _ = gen.target_logprobs(ctx, torch.arange(len(questions) * K), targets.repeat_interleave(K, 0))
        loss = -(lp * mask.repeat_interleave(K, 0)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gen.eval()
    tokens = {}
    for name in ("float32", "bfloat16"):
        gen.place(CPU, name)
        with torch.inference_mode():
            hyps = decoding.rag_token(gen, gen.prepare(questions, passages), doc_logprobs(torch.zeros(3, K)),
                                      DecodingConfig(max_new_tokens=8))
        tokens[name] = [h[0].tokens for h in hyps]
    assert [gen.decode(list(t)) for t in tokens["float32"]] == answers  # it learnt them
    assert tokens["bfloat16"] == tokens["float32"]


def test_an_index_built_in_bfloat16_is_searched_from_float32(tmp_path, tiny_bert, tiny_lms):
    from index_builder.build import build
    from rag.config import BuildConfig, load_config
    from rag.retrieval.index_folder import IndexFolder
    from tests.conftest import DOCS, write_jsonl

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    out = build(load_config(BuildConfig, None, [f"output={tmp_path / 'bf16'}", f"corpus.path={corpus}",
                                                f"encoder.name={tiny_bert}", "encoder.precision=bfloat16",
                                                "passages.words=12", "passages.stride=8"]), progress=False)
    manifest = IndexFolder(out).read_manifest()
    assert manifest["build"]["precision"] == "bfloat16"  # recorded; the stored vectors are float32
    assert np.load(out / "vectors.npy", mmap_mode="r").dtype == np.float32
    pipe = RagPipeline.load(rag_config(out, tiny_bert, tiny_lms["llama"], precision="float32"))
    hits = pipe.retrieve(["capital of france"], 3)[0]
    assert len(hits) == 3 and hits[0].score >= hits[-1].score


def test_training_follows_the_knob(tmp_path, tiny_index, tiny_bert, tiny_lms, monkeypatch):
    """accelerate's mixed precision is the RAG config's precision: one knob for serving and training."""
    import yaml

    from rag.config import TrainConfig, load_config, to_dict
    from rag.pipeline import load_rag_config
    from rag.train import _mixed_precision

    rag = tmp_path / "rag.yaml"
    rag.write_text(yaml.safe_dump(to_dict(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]))))
    for knob, expected in (("float32", "no"), ("bfloat16", "bf16")):
        cfg = load_config(TrainConfig, None, [f"rag={rag}", f"rag_set=[precision={knob}]"])
        assert _mixed_precision(load_rag_config(cfg.rag, cfg.rag_set)) == expected
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset())
    cfg = dataclasses.replace(load_config(TrainConfig, None, [f"rag={rag}"]), rag_set=("precision=auto",))
    assert _mixed_precision(load_rag_config(cfg.rag, cfg.rag_set)) == "no"


def test_openmp_threads_wait_passively_unless_the_user_says(tmp_path):
    """Spinning OpenMP threads made warm answer() 2x slower beside another busy process; the project's programs set
    PASSIVE before torch loads and leave a user's own choice alone; a library import changes nothing."""
    import os
    import subprocess
    import sys

    def policy(module: str, env: dict) -> str:
        code = f"import {module}, os; print(os.environ.get('OMP_WAIT_POLICY'))"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert policy("rag", env) == "None"
    for program in ("rag.cli", "index_builder.__main__", "eval.qa", "rag.train"):
        assert policy(program, env) == "PASSIVE", program
    assert policy("rag.cli", {**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
