import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rag.config import load_config, save_config
from rag.errors import BadInput
from rag.model import LossSettings, RagModel
from rag.pipeline import RagPipeline
from rag.train import TrainConfig, TrainingError, train
from tests.conftest import DOCS, write_jsonl

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert, tiny_lms):
    """A tiny index, a RAG config with tiny models, and a toy QA set whose answers sit in single passages."""
    from index_builder.build import build
    from rag.config import BuildConfig

    root = tmp_path_factory.mktemp("train")
    corpus = write_jsonl(root / "corpus.jsonl", DOCS)
    build(load_config(BuildConfig, None, [f"output={root / 'index'}", f"corpus.path={corpus}",
                                          f"encoder.name={tiny_bert}", "passages.words=12", "passages.stride=8"]),
          progress=False)
    rag = root / "rag.yaml"
    rag.write_text(f"index: {root / 'index'}\nquery_encoder:\n  name: {tiny_bert}\n  max_length: 32\n"
                   f"generator:\n  name: {tiny_lms['llama']}\n  max_target_length: 6\n"
                   "decoding:\n  max_new_tokens: 4\nn_docs: 3\nprecision: float32\n")
    qa = write_jsonl(root / "qa.jsonl", [
        {"question": "capital of france", "answer": ["paris"]},
        {"question": "capital of england", "answer": ["london"]},
        {"question": "who wrote the novel", "answer": ["austen"]},
        {"question": "the moon rocket", "answer": ["apollo"]},
        {"question": "no answer here", "answer": []},
    ])
    return root, rag, qa


def cfg_for(setup, tmp_path, *extra) -> TrainConfig:
    root, rag, qa = setup
    return load_config(TrainConfig, None, [
        f"rag={rag}", f"output_dir={tmp_path / 'run'}", f"data.train=[{qa}]", f"data.dev={qa}", "data.dev_limit=2",
        "rag_set=[n_docs=3, mode=sequence]", "batch_size=2", "max_steps=6", "warmup_steps=0", "lr_query_encoder=0.05", "lr_generator=0.01",
        "checkpoint_every=3", "eval_every=6", "log_every=1", "tracker=csv", *extra])


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for _, p in sorted(module.named_parameters()):
        h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()


def test_query_encoder_learns_and_nothing_else_moves(setup, tmp_path):
    root = setup[0]
    index_files = {p.name: p.read_bytes() for p in (root / "index").iterdir() if p.is_file()}
    start = RagPipeline.load(setup[1])
    questions, answers = ["capital of france", "capital of england", "who wrote the novel", "the moon rocket"], \
        ["paris", "london", "austen", "apollo"]
    before = start.model.loss(questions, answers, n_docs=3).mean().item()
    done = train(cfg_for(setup, tmp_path, "max_steps=30", "checkpoint_every=100", "eval_every=100"),
                 progress=False)
    model = done.pipeline.model
    after = model.loss(questions, answers, n_docs=3).mean().item()
    assert after < before - 0.05
    assert digest(model.retriever.encoder) != digest(start.model.retriever.encoder)
    assert digest(model.generator) == digest(start.model.generator)  # frozen
    assert {p.name: p.read_bytes() for p in (root / "index").iterdir() if p.is_file()} == index_files
    again = RagPipeline.load(done.final)  # the saved model loads into answer()
    assert (again.cfg.mode, again.cfg.n_docs) == ("sequence", 3)  # served as it was trained (rag_set)
    assert digest(again.model.retriever.encoder) == digest(model.retriever.encoder)
    q = "capital of france"
    a, b = again.answer(q, mode="token"), done.pipeline.answer(q, mode="token")  # the saved model is the trained one
    assert (a.text, a.tokens, [p.id for p in a.passages]) == (b.text, b.tokens, [p.id for p in b.passages])
    assert np.allclose([p.posterior for p in a.passages], [p.posterior for p in b.passages], atol=1e-4)


def test_gradient_reaches_bert_q_through_doc_scores(setup):
    pipe = RagPipeline.load(setup[1])
    pipe.model.generator.requires_grad_(False)
    loss = pipe.model.loss(["capital of france"], ["paris"], n_docs=3).sum()
    loss.backward()
    grads = [p.grad for n, p in pipe.model.retriever.encoder.named_parameters() if "pooler" not in n]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_generator_switch(setup, tmp_path):
    start = RagPipeline.load(setup[1])
    done = train(cfg_for(setup, tmp_path, "train_query_encoder=false", "train_generator=true", "max_steps=2"),
                 progress=False)
    assert digest(done.pipeline.model.retriever.encoder) == digest(start.model.retriever.encoder)
    assert digest(done.pipeline.model.generator) != digest(start.model.generator)
    with pytest.raises(TrainingError, match="nothing to train"):
        train(cfg_for(setup, tmp_path, "train_query_encoder=false"), progress=False)


class Killed(BaseException):
    """Stands for a kill signal (not an Exception: nothing in the loop may swallow it)."""


def test_resume_reproduces_the_uninterrupted_run(setup, tmp_path, monkeypatch):
    full = train(cfg_for(setup, tmp_path / "a"), progress=False)
    real, calls = RagModel.loss, []

    def dies_in_step_5(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RagModel, "loss", dies_in_step_5)
    with pytest.raises(Killed):  # killed in step 5: steps 4-5 are lost, step 3's checkpoint is kept
        train(cfg_for(setup, tmp_path / "b"), progress=False)
    monkeypatch.setattr(RagModel, "loss", real)
    resumed = train(cfg_for(setup, tmp_path / "b"), resume="latest", progress=False)
    assert digest(resumed.pipeline.model.retriever.encoder) == digest(full.pipeline.model.retriever.encoder)
    loss_rows = lambda run: [r for r in (run / "run" / "metrics.csv").read_text().splitlines() if ",loss," in r]
    assert loss_rows(tmp_path / "b")[-3:] == loss_rows(tmp_path / "a")[-3:]  # steps 4-6 logged the same losses


def test_resume_refuses_another_config(setup, tmp_path):
    train(cfg_for(setup, tmp_path, "max_steps=3"), progress=False)
    with pytest.raises(TrainingError, match="another config .*lr_query_encoder"):
        train(cfg_for(setup, tmp_path, "lr_query_encoder=0.5"), resume="latest", progress=False)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(cfg_for(setup, tmp_path / "empty"), resume="latest", progress=False)


def test_nan_loss_stops_with_the_step_and_batch(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(RagModel, "loss", lambda self, q, a, *args, **kw: torch.full((len(q),), float("nan"),
                                                                                       requires_grad=True))
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 on the batch starting \["):
        train(cfg_for(setup, tmp_path), progress=False)


def test_bad_training_file(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": ["a"]}\n{oops\n')
    from rag.retrieval.passages import CorpusError

    with pytest.raises(CorpusError, match=rf"{bad}:2: malformed JSON"):
        train(cfg_for(setup, tmp_path, f"data.train=[{bad}]"), progress=False)


@pytest.mark.slow
def test_two_processes_end_with_identical_parameters(setup, tmp_path):
    cfg = cfg_for(setup, tmp_path, "max_steps=3", "data.dev=null")
    save_config(cfg, tmp_path / "train.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(REPO / "tests" / "_train_worker.py"), str(tmp_path / "train.yaml")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    hashes = [(tmp_path / "run" / f"rank{i}.txt").read_text() for i in range(2)]
    assert hashes[0] == hashes[1]
    assert hashes[0] != digest(RagPipeline.load(setup[1]).model.retriever.encoder)  # and training moved them


def test_distant_supervision_alone_trains_bert_q_without_the_generator(setup, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the generator ran")

    start = RagPipeline.load(setup[1])
    questions, answers = ["capital of france", "capital of england", "who wrote the novel", "the moon rocket"], \
        ["paris", "london", "austen", "apollo"]

    def distant(model):
        with torch.no_grad():
            return model(questions, answers, LossSettings(n_docs=3, rag_weight=0.0, distant_weight=1.0,
                                                          distant_docs=8)).mean()

    before = distant(start.model).item()
    monkeypatch.setattr(RagModel, "target_logprobs", never)
    done = train(cfg_for(setup, tmp_path, "rag_loss=0", "distant_loss=1", "distant_docs=8", "max_steps=20",
                         "data.dev=null", "checkpoint_every=100"), progress=False)
    assert distant(done.pipeline.model).item() < before - 0.05
    assert digest(done.pipeline.model.retriever.encoder) != digest(start.model.retriever.encoder)
    with pytest.raises(TrainingError, match="no loss at all"):
        train(cfg_for(setup, tmp_path, "rag_loss=0"), progress=False)
    with pytest.raises(TrainingError, match="generator without a loss"):
        train(cfg_for(setup, tmp_path, "rag_loss=0", "distant_loss=1", "train_generator=true"), progress=False)


def test_the_rag_and_distant_losses_add(setup):
    model = RagPipeline.load(setup[1]).model
    q, a = ["capital of france", "who wrote the novel"], ["paris", "austen"]
    with torch.no_grad():
        both = model(q, a, LossSettings(n_docs=3, rag_weight=1.0, distant_weight=0.5, distant_docs=8))
        rag = model.loss(q, a, n_docs=3)
        distant = model(q, a, LossSettings(n_docs=3, rag_weight=0.0, distant_weight=1.0, distant_docs=8))
    assert torch.allclose(both, rag + 0.5 * distant, atol=1e-5) and (rag > 0).all()


def test_a_kill_while_writing_a_checkpoint_resumes_from_the_last_whole_one(setup, tmp_path, monkeypatch):
    """Killed half-way through writing step 6's checkpoint: `--resume latest` takes step 3's, the whole one, and
    the run completes (it once picked the half-written folder and could not load it)."""
    from rag import checkpoint

    real = checkpoint.save

    def dies_writing_step_6(folder, *args, **kwargs):
        if "step-6" in str(folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "trainable.safetensors").write_bytes(b"half")
            raise Killed
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", dies_writing_step_6)
    with pytest.raises(Killed):
        train(cfg_for(setup, tmp_path, "data.dev=null"), progress=False)
    monkeypatch.setattr(checkpoint, "save", real)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".step-6.partial", "step-3"]
    done = train(cfg_for(setup, tmp_path, "data.dev=null"), resume="latest", progress=False)
    assert done.final.is_dir() and sorted(p.name for p in checkpoints.iterdir()) == ["step-3", "step-6"]


def test_checkpoints_hold_no_pickle_and_no_frozen_part(setup, tmp_path, monkeypatch):
    """A checkpoint is safetensors and JSON only (a crafted pickle once ran code on --resume), holds only what
    trains (a frozen generator was saved into every checkpoint), and resuming never calls torch.load."""
    from safetensors.torch import load_file

    train(cfg_for(setup, tmp_path, "data.dev=null", "max_steps=3"), progress=False)
    step = tmp_path / "run" / "checkpoints" / "step-3"
    assert {p.suffix for p in step.iterdir()} <= {".safetensors", ".json", ".yaml"}
    names = load_file(step / "trainable.safetensors").keys()
    assert names and all(n.startswith("retriever.encoder.") for n in names)  # the generator is frozen here

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called while resuming")

    monkeypatch.setattr(torch, "load", no_unpickling)
    done = train(cfg_for(setup, tmp_path, "data.dev=null", "max_steps=4"), resume="latest", progress=False)
    assert done.final.is_dir()


def test_a_damaged_checkpoint_is_one_line_naming_the_file(setup, tmp_path):
    from rag.checkpoint import CheckpointError

    train(cfg_for(setup, tmp_path, "data.dev=null", "max_steps=3"), progress=False)
    step = tmp_path / "run" / "checkpoints" / "step-3"
    (step / "optimizer.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        train(cfg_for(setup, tmp_path, "data.dev=null", "max_steps=4"), resume="latest", progress=False)
    (step / "progress.json").unlink()
    with pytest.raises(CheckpointError, match="progress.json is missing"):
        train(cfg_for(setup, tmp_path, "data.dev=null", "max_steps=4"), resume="latest", progress=False)


def test_lora_trains_adapters_only_and_the_saved_adapters_answer_as_trained(setup, tmp_path):
    """With lora.rank > 0 both parts get peft LoRA layers: the base weights do not move, the final folder holds
    adapters only (no full weights), and loading it (adapters merged into the base) answers as the trained model."""
    done = train(cfg_for(setup, tmp_path, "train_generator=true", "lora.rank=4", "lora.alpha=8",
                         "lora.generator_modules=[q_proj, v_proj]", "lora.query_encoder_modules=[query, value]",
                         "max_steps=8", "lr_query_encoder=0.05", "lr_generator=0.05", "data.dev=null"),
                 progress=False)
    final = done.final
    for part in ("query_encoder", "generator"):
        files = {p.name for p in (final / part).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    trained = done.pipeline
    again = RagPipeline.load(final)
    assert again.cfg.generator.adapter == str(final / "generator")
    base = RagPipeline.load(setup[1])
    assert digest(again.model.generator) != digest(base.model.generator)  # the adapter was merged in
    q = ["capital of france", "the moon rocket"]
    with torch.no_grad():
        a = again.model.loss(q, ["paris", "apollo"], n_docs=3)
        b = trained.model.loss(q, ["paris", "apollo"], n_docs=3)
    assert torch.allclose(a, b, atol=1e-4)
    x, y = again.answer(q[0], mode="token"), trained.answer(q[0], mode="token")
    assert (x.text, [p.id for p in x.passages]) == (y.text, [p.id for p in y.passages])


def test_a_bad_adapter_is_one_line(setup, tmp_path, tiny_lms):
    from rag.config import ConfigError

    with pytest.raises(ConfigError, match="generator.adapter.*no adapter_config.json"):
        RagPipeline.load(setup[1], ["generator.adapter=" + str(tmp_path)])
    done = train(cfg_for(setup, tmp_path, "train_generator=true", "train_query_encoder=false", "lora.rank=2",
                         "max_steps=1", "data.dev=null"), progress=False)
    with pytest.raises(ConfigError, match="generator.adapter.*does not fit"):  # trained on llama, given gpt2
        RagPipeline.load(setup[1], [f"generator.name={tiny_lms['gpt2']}",
                                    f"generator.adapter={done.final / 'generator'}"])


def test_rows_of_a_qa_file(tmp_path):
    from rag.qa_data import data_rows, read_qa

    assert data_rows("a/nq.jsonl[500:]") == (Path("a/nq.jsonl"), slice(500, None))
    assert data_rows("a/nq.jsonl[:10]") == (Path("a/nq.jsonl"), slice(None, 10))
    assert data_rows("a/nq.jsonl") == (Path("a/nq.jsonl"), slice(None))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{i}", "answer": [f"a{i}"]}) + "\n" for i in range(5)))
    assert [e.question for e in read_qa(f"{qa}[1:3]")] == ["q1", "q2"]
    odd = tmp_path / "odd[1:2]"  # a file whose own name looks like rows is read whole
    odd.write_text(qa.read_text())
    assert len(read_qa(odd)) == 5


def test_unanswerable_questions_weighted(setup):
    """unanswerable_weight scales the RAG loss of questions none of whose passages holds the answer; at 0 they
    never reach the generator."""
    pipe = RagPipeline.load(setup[1])
    model = pipe.model
    held = pipe.retrieve("capital of france", 3)[0][0].text.split()[0]  # a word its first passage holds
    q, a = ["capital of france", "capital of france"], [held, "zanzibar"]
    with torch.no_grad():
        full = model(q, a, LossSettings(n_docs=3))
        half = model(q, a, LossSettings(n_docs=3, unanswerable_weight=0.5))
        none = model(q, a, LossSettings(n_docs=3, unanswerable_weight=0.0))
    assert torch.allclose(half, full * torch.tensor([1.0, 0.5]), atol=1e-5)
    assert none[1] == 0 and torch.isclose(none[0], full[0], atol=1e-5)


def test_prior_scale_sharpens_the_prior(setup):
    pipe = RagPipeline.load(setup[1], ["prior_scale=20"])
    flat = RagPipeline.load(setup[1])
    a, b = pipe.answer("capital of france"), flat.answer("capital of france")
    assert max(p.prior for p in a.passages) > max(p.prior for p in b.passages)
    assert [p.score for p in a.passages] == [p.score for p in b.passages]


def test_a_diverging_step_stops_the_run_and_saves_nothing(setup, tmp_path, monkeypatch):
    """A step that overflowed the weights once saved them as final/ with exit 0; a pipeline over them answered ''."""
    real = torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].mul_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    with pytest.raises(TrainingError, match="step 1 made trained weights NaN or infinite"):
        train(cfg_for(setup, tmp_path, "max_steps=1", "data.dev=null"), progress=False)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_weights_are_neither_saved_nor_used(setup, tmp_path):
    from rag.retrieval.retriever import NonFinite

    pipe = RagPipeline.load(setup[1])
    with torch.no_grad():
        next(pipe.parts()["query_encoder"].parameters()).fill_(float("nan"))
    with pytest.raises(NonFinite, match="NaN or infinite"):
        pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(NonFinite, match="query encoder gave NaN"):
        pipe.answer("capital of france")
    assert not (tmp_path / "saved").exists()


def test_a_second_run_into_one_output_dir_keeps_nothing_of_the_first(setup, tmp_path):
    """A LoRA run then a full run into one output_dir once kept the first run's adapter beside the new weights, and
    loading preferred the stale adapter."""
    train(cfg_for(setup, tmp_path, "lora.rank=2", "max_steps=1", "data.dev=null"), progress=False)
    assert (tmp_path / "run" / "final" / "query_encoder" / "adapter_config.json").is_file()
    done = train(cfg_for(setup, tmp_path, "max_steps=1", "data.dev=null", "lr_query_encoder=0.5"), progress=False)
    files = {p.name for p in (done.final / "query_encoder").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    again = RagPipeline.load(done.final)
    assert digest(again.model.retriever.encoder) == digest(done.pipeline.model.retriever.encoder)
    with pytest.raises(BadInput, match="not a saved pipeline"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("x")
        done.pipeline.save_pretrained(tmp_path / "mine")
