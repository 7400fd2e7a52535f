import json

import pytest

from eval import qa
from rag import metrics
from rag.pipeline import RagPipeline
from rag.qa_data import QAReport, read_qa
from rag.retrieval.passages import CorpusError
from tests.conftest import rag_config, write_jsonl


@pytest.mark.parametrize("pred, golds, bleu, rouge", [
    ("the cat sat on the mat", ["a cat on a mat"], 0.75, 6 / 7),  # BLEU-1: p=3/4, no brevity penalty; LCS 3 of 4, 3
    ("cat sat", ["cat sat down"], 0.6065, 0.8),  # brevity penalty exp(1 - 3/2)
    ("Pelé", ["Pele\u0301"], 1.0, 1.0),
    ("dog", ["cat"], 0.0, 0.0),
    ("", ["cat"], 0.0, 0.0),
    ("the", ["an"], 1.0, 1.0),  # both empty after normalisation
])
def test_bleu1_and_rouge_l_by_hand(pred, golds, bleu, rouge):
    assert metrics.bleu1(pred, golds) == pytest.approx(bleu, abs=1e-3)
    assert metrics.rouge_l(pred, golds) == pytest.approx(rouge)


def test_rouge_l_is_the_longest_common_subsequence():
    # "b c d" vs "c d b" (the article "a" normalises away): LCS "c d", P = R = 2/3
    assert metrics.rouge_l("a b c d", ["a c d b"]) == pytest.approx(2 / 3)
    assert metrics.rouge_l("x y", ["nothing", "y z x y"]) == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_curatedtrec_reader(tmp_path):
    path = tmp_path / "trec.tsv"
    path.write_text('who was the first president ?\t["(George )?Washington"]\n'
                    "where is the eiffel tower ?\t['Paris']\n\nbroken line without tab\n")
    with pytest.raises(CorpusError, match=rf"{path}:4: expected"):
        read_qa(path)
    report = QAReport()
    got = read_qa(path, on_error="skip", report=report)
    assert [(e.answers, e.patterns) for e in got] == [(("(George )?Washington",), True), (("Paris",), True)]
    assert report.skipped_malformed == 1
    assert metrics.regex_match("George Washington", got[0].answers) == 1.0
    assert metrics.has_answer("In 1789 Washington took office.", got[0].answers, patterns=True)


def test_configurable_jsonl_fields(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "who?", "gold": "me"}])
    assert read_qa(path, question_field="q", answer_field="gold")[0].answers == ("me",)


@pytest.fixture(scope="module")
def pipe(tiny_index, tiny_bert, tiny_lms):
    return RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]))


QUESTIONS = [
    {"question": "which river is in paris ?", "answer": ["Seine"]},
    {"question": "who wrote pride and prejudice ?", "answer": ["Austen", "Jane Austen"]},
    {"question": "what is the capital of japan ?", "answer": ["Tokyo"]},
    {"question": "which ocean has coral ?", "answer": ["Pacific"]},
    {"question": "who composed symphonies in vienna ?", "answer": ["Mozart"]},
]


def test_eval_cli_end_to_end(tmp_path, pipe, tiny_index, tiny_bert, tiny_lms, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", QUESTIONS)
    cfg = tmp_path / "rag.yaml"
    from rag.config import save_config

    save_config(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]), cfg)
    out = tmp_path / "eval"
    assert qa.main(["--config", str(cfg), "--data", str(data), "--limit", "4", "--mode",
                    "retrieval,token,sequence,closed-book,concat", "--out", str(out), "--quiet",
                    "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    assert "| token (answerable) | 3 |" in table and "| retrieval (all) | 4 |" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"retrieval", "token", "sequence", "closed-book", "concat"}
    for rows in summary.values():
        assert rows["all"]["n"] == 4 and rows["answerable"]["n"] == 3  # Tokyo is nowhere in the corpus
    assert summary["retrieval"]["all"]["recall@100"] == 75.0  # every passage retrieved: the 3 answerable
    recs = [json.loads(line) for line in (out / "predictions.token.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2, 3]
    assert [r["answerable"] for r in recs] == [True, True, False, True]
    assert all(len(r["retrieved"]) == len(r["titles"]) == len(r["scores"]) == 3 for r in recs)
    assert all(isinstance(r["prediction"], str) and {"em", "f1", "bleu1", "rouge_l"} <= set(r) for r in recs)
    book = [json.loads(line) for line in (out / "predictions.closed-book.jsonl").read_text().splitlines()]
    assert all(r["retrieved"] == [] for r in book)
    concat = [json.loads(line) for line in (out / "predictions.concat.jsonl").read_text().splitlines()]
    assert all(len(r["retrieved"]) == 1 and r["retrieved"][0].count("+") == 2 for r in concat)


def test_eval_resumes_where_it_stopped(tmp_path, pipe):
    examples = read_qa(write_jsonl(tmp_path / "qa.jsonl", QUESTIONS))
    full = qa.evaluate(pipe, examples, ["token"], tmp_path / "a", batch_size=2, progress=False)
    path = tmp_path / "a" / "predictions.token.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # killed while writing the third record
    asked = []
    real = pipe.answer_batch

    def counting(questions, *args, **kw):
        asked.extend(questions)
        return real(questions, *args, **kw)

    pipe.answer_batch = counting
    try:
        again = qa.evaluate(pipe, examples, ["token"], tmp_path / "a", batch_size=2, progress=False)
    finally:
        del pipe.answer_batch
    assert asked == [e.question for e in examples[2:]]
    assert again == full
    assert path.read_text().splitlines() == lines


def test_eval_cli_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": ["a"]}\n{oops\n')
    assert qa.main(["--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qa.main(["--data", str(bad), "--mode", "bogus"])


def test_given_passages_replace_retrieval(pipe):
    closed = pipe.answer_batch(["who wrote the book ?"], passages=[[None]])[0]
    assert closed.passages == () and isinstance(closed.text, str)
    p = pipe.model.retriever.index.passages([0])[0]
    given = pipe.answer_batch(["who wrote the book ?"], passages=[[p, p]])[0]
    assert [x.id for x in given.passages] == [p.id, p.id] and given.passages[0].prior == pytest.approx(0.5)
    with pytest.raises(ValueError, match="passage lists"):
        pipe.answer_batch(["a", "b"], passages=[[p]])


def test_a_rerun_with_other_data_or_settings_is_refused(tmp_path, pipe):
    """Resuming scores only what was asked of the same evaluation: other questions, k or decoding are refused,
    naming what differs (a rerun with another --data once reported "24 of 24 already done")."""
    examples = read_qa(write_jsonl(tmp_path / "qa.jsonl", QUESTIONS))
    qa.evaluate(pipe, examples[:2], ["retrieval"], tmp_path / "out", progress=False)
    with pytest.raises(qa.RunMismatch, match="data differ"):
        qa.evaluate(pipe, examples[1:3], ["retrieval"], tmp_path / "out", progress=False)
    with pytest.raises(qa.RunMismatch, match="n_docs differ"):
        qa.evaluate(pipe, examples[:2], ["retrieval"], tmp_path / "out", n_docs=2, progress=False)
    with pytest.raises(qa.RunMismatch, match="decoding differ"):
        qa.evaluate(pipe, examples[:2], ["retrieval"], tmp_path / "out", decoding={"num_beams": 2}, progress=False)
    qa.evaluate(pipe, examples[:2], ["retrieval", "token"], tmp_path / "out", progress=False)  # same run, more modes


@pytest.mark.parametrize("args, words", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--n-docs", "0"], "--n-docs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_eval_numbers_out_of_range_are_one_line(tmp_path, capsys, args, words):
    """--limit 0 once evaluated everything, --limit -1 dropped the last question, --n-docs 0 was ignored."""
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q", "answer": ["a"]}\n')
    assert qa.main(["--data", str(data), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
