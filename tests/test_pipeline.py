import logging

import numpy as np
import pytest
import torch

from rag.pipeline import Answer, RagPipeline
from rag.retrieval.index import IndexFolderError
from tests.conftest import DOCS, HAS_DEMO, rag_config, write_jsonl


@pytest.fixture(scope="module", params=["llama", "t5"])
def pipe(request, tiny_index, tiny_bert, tiny_lms):
    return RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms[request.param]))


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_answer_has_provenance(pipe, mode):
    ans = pipe.answer("what is the capital of france ?", mode=mode)
    assert isinstance(ans, Answer) and ans.mode == mode and len(ans.passages) == 3
    assert abs(sum(p.prior for p in ans.passages) - 1) < 1e-5
    assert abs(sum(p.posterior for p in ans.passages) - 1) < 1e-5
    assert all(p.id and p.title and p.text for p in ans.passages)
    scores = [p.score for p in ans.passages]
    assert scores == sorted(scores, reverse=True)
    if mode == "token":
        assert len(ans.token_posteriors) == len(ans.tokens) > 0
        assert all(abs(sum(row) - 1) < 1e-5 and len(row) == 3 for row in ans.token_posteriors)
    else:
        assert ans.token_posteriors is None


def test_batch_equals_one_by_one(pipe):
    qs = ["what is the capital of france ?", "who wrote the novel ?", "the moon rocket"]
    batch = pipe.answer_batch(qs, batch_size=2)
    single = [pipe.answer(q) for q in qs]
    assert [a.text for a in batch] == [a.text for a in single]
    assert [[p.id for p in a.passages] for a in batch] == [[p.id for p in a.passages] for a in single]
    # the posteriors come from one teacher-forced pass over the batch's answers of different lengths
    for a, b in zip(batch, single, strict=True):
        assert [p.posterior for p in a.passages] == pytest.approx([p.posterior for p in b.passages], abs=1e-5)
        torch.testing.assert_close(torch.tensor(a.token_posteriors), torch.tensor(b.token_posteriors), atol=1e-5,
                                   rtol=0)


def test_decoding_options(pipe):
    ans = pipe.answer("capital of france", decoding={"num_beams": 3, "max_new_tokens": 4}, n_docs=2)
    assert len(ans.passages) == 2 and len(ans.tokens) <= 4
    fast = pipe.answer("capital of france", mode="sequence", decoding={"num_beams": 2, "sequence_decoding": "fast"})
    thorough = pipe.answer("capital of france", mode="sequence", decoding={"num_beams": 2})
    gen = pipe.model.generator
    assert fast.mode == "sequence" and fast.tokens and fast.score <= 0
    assert fast.text == gen.decode(gen.tokenizer.convert_tokens_to_ids(list(fast.tokens)))
    if fast.text == thorough.text:  # fast counts p(y|x,z) = 0 where z's beam missed y: a lower bound
        assert fast.score <= thorough.score + 1e-4


def test_bad_input(pipe, caplog):
    with pytest.raises(ValueError, match="empty"):
        pipe.answer("   ")
    with pytest.raises(TypeError, match="string"):
        pipe.answer(42)
    with pytest.raises(TypeError, match="string"):
        pipe.answer_batch(["ok", None])
    with pytest.raises(ValueError, match="mode"):
        pipe.answer("capital", mode="both")
    with caplog.at_level(logging.WARNING):
        ans = pipe.answer("capital", n_docs=10_000)
    assert "larger than the index" in caplog.text and len(ans.passages) == len(pipe.model.retriever.index)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe.answer("capital " * 40)
    assert "truncated" in caplog.text
    with pytest.raises(ValueError, match="no questions"):
        pipe.retrieve([])
    with pytest.raises(TypeError, match="must be a rag.retrieval.passages.PassageRecord"):
        pipe.answer_batch(["capital"], passages=[["text"]])
    with pytest.raises(TypeError, match="one list per question"):
        pipe.answer_batch(["capital"], passages=["text"])
    with pytest.raises(ValueError, match="not valid text"):
        pipe.answer("capital \udcff of france")  # what invalid UTF-8 bytes on a command line become


def test_missing_or_mismatched_index(tmp_path, tiny_index, tiny_bert, tiny_lms):
    with pytest.raises(IndexFolderError, match=rf"{tmp_path / 'nope'}.*index_builder build"):
        RagPipeline.load(rag_config(tmp_path / "nope", tiny_bert, tiny_lms["llama"]))
    cfg = rag_config(tiny_index, tiny_bert, tiny_lms["llama"])
    with pytest.raises(IndexFolderError, match="pooling"):
        RagPipeline.load(cfg, ("query_encoder.pooling=cls",))


def test_gpt2_without_pad_token_or_chat_template(tiny_index, tiny_bert, tiny_lms, caplog):
    with caplog.at_level(logging.WARNING):
        pipe = RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms["gpt2"]))
    assert "no chat template" in caplog.text
    ans = pipe.answer("capital of france")  # pads with EOS under the mask: the provenance still adds up
    assert ans.tokens and len(ans.passages) == 3 and abs(sum(p.posterior for p in ans.passages) - 1) < 1e-5
    assert len(ans.token_posteriors) == len(ans.tokens) and all(abs(sum(r) - 1) < 1e-5 for r in ans.token_posteriors)
    assert ans.text == pipe.model.generator.decode(pipe.model.generator.tokenizer.convert_tokens_to_ids(list(ans.tokens)))


def test_save_and_load_pretrained(pipe, tmp_path):
    before = pipe.answer("who wrote the novel ?")
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "generator" / "model.safetensors").is_file()
    again = RagPipeline.load(tmp_path / "saved").answer("who wrote the novel ?")
    assert again.text == before.text and [p.id for p in again.passages] == [p.id for p in before.passages]


has_demo = HAS_DEMO


@pytest.mark.real_weights
@pytest.mark.skipif(not has_demo, reason="the demo extra is not installed")
def test_embedded_default_answers_from_the_demo_corpus(tmp_path):
    """The real default (MiniLM + SmolLM2-135M) over a slice of the demo corpus that holds the answer."""
    import json

    from rag.retrieval.passages import demo_corpus_path

    data = json.loads(demo_corpus_path().read_text(encoding="utf-8"))
    keep = [k for k in data if k in ("Pride and Prejudice", "Jane Austen")] + list(data)[:150]
    corpus = write_jsonl(tmp_path / "slice.jsonl", [{"id": k, "title": data[k]["title"], "text": data[k]["extract"]}
                                                    for k in dict.fromkeys(keep)])
    from index_builder.build import build
    from rag.config import BuildConfig, load_config

    build(load_config(BuildConfig, "configs/index/demo.yaml",
                      [f"output={tmp_path / 'index'}", "corpus.format=jsonl", f"corpus.path={corpus}"]),
          progress=False)
    pipe = RagPipeline.load("configs/rag/demo.yaml", (f"index={tmp_path / 'index'}",))
    ans = pipe.answer("Who wrote Pride and Prejudice?")
    assert "Austen" in ans.text
    best = max(ans.passages, key=lambda p: p.posterior)
    assert best.title in ("Pride and Prejudice", "Jane Austen")

    # the knowledge follows the index: delete the supporting documents, then add them back
    from index_builder.update import update

    (tmp_path / "gone.txt").write_text("Pride and Prejudice\nJane Austen\n")
    update(tmp_path / "index", delete=str(tmp_path / "gone.txt"), progress=False)
    pipe.reload_index()
    without = pipe.answer("Who wrote Pride and Prejudice?")
    assert not {p.title for p in without.passages} & {"Pride and Prejudice", "Jane Austen"}
    write_jsonl(tmp_path / "back.jsonl", [{"id": k, "title": data[k]["title"], "text": data[k]["extract"]}
                                          for k in ("Pride and Prejudice", "Jane Austen")])
    update(tmp_path / "index", add=str(tmp_path / "back.jsonl"), progress=False)
    assert pipe.reload_index() == 2
    again = pipe.answer("Who wrote Pride and Prejudice?")
    assert "Austen" in again.text
    assert max(again.passages, key=lambda p: p.posterior).title in ("Pride and Prejudice", "Jane Austen")


def test_reload_index_follows_updates(tmp_path, tiny_bert, tiny_lms):
    """Delete the document a question retrieves, reload: it is gone from the provenance; add it back: it returns."""
    import shutil

    from index_builder.build import build
    from index_builder.update import update
    from rag.config import BuildConfig, load_config

    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)
    build(load_config(BuildConfig, None, [f"output={tmp_path / 'index'}", f"corpus.path={corpus}",
                                          f"encoder.name={tiny_bert}", "passages.words=12", "passages.stride=8"]),
          progress=False)
    pipe = RagPipeline.load(rag_config(tmp_path / "index", tiny_bert, tiny_lms["llama"]))
    model_before = pipe.model.generator.model
    q = "pride and prejudice novel austen"
    top = pipe.answer(q).passages[0].id.split("#")[0]
    (tmp_path / "gone.txt").write_text(top + "\n")
    update(tmp_path / "index", delete=str(tmp_path / "gone.txt"), progress=False)
    in_flight = pipe.model.retriever.index
    assert pipe.reload_index() == 1
    assert all(not p.id.startswith(top + "#") for p in pipe.answer(q).passages)
    assert pipe.model.generator.model is model_before  # models were not reloaded
    assert in_flight.generation == 0 and len(in_flight.search(np.zeros((1, in_flight.dim), np.float32), 3).ids[0])
    write_jsonl(tmp_path / "back.jsonl", [d for d in DOCS if d["id"] == top])
    update(tmp_path / "index", add=str(tmp_path / "back.jsonl"), progress=False)
    pipe.reload_index()
    assert pipe.answer(q).passages[0].id.split("#")[0] == top
    shutil.copytree(tmp_path / "index", tmp_path / "other")
    assert pipe.reload_index(tmp_path / "other") == 2 and pipe.cfg.index == str(tmp_path / "other")


def test_question_mark_option_encodes_questions_ending_in_one(pipe):
    import dataclasses

    import torch

    retriever = pipe.model.retriever
    cfg = retriever.encoder.cfg
    plain = retriever.encode(["capital of france", "who wrote the novel ?"])
    try:
        retriever.encoder.cfg = dataclasses.replace(cfg, question_mark=True)
        marked = retriever.encode(["capital of france", "who wrote the novel ?"])
    finally:
        retriever.encoder.cfg = cfg
    assert torch.allclose(marked[0], retriever.encode(["capital of france?"])[0], atol=1e-6)
    assert not torch.allclose(marked[0], plain[0])
    assert torch.allclose(marked[1], plain[1], atol=1e-6)  # already a question: unchanged
