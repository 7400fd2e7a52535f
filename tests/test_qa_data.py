import json

import pytest

from rag import metrics
from rag.qa_data import QAReport, read_qa
from rag.retrieval.passages import CorpusError

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data" / "qa"


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("The Eiffel Tower", ["eiffel tower"], 1.0, 1.0),
    ("a  Paris!", ["paris"], 1.0, 1.0),
    ("Paris, France", ["Paris"], 0.0, 2 / 3),
    ("", ["paris"], 0.0, 0.0),
    ("", [""], 1.0, 1.0),
    ("Pelé", ["Pele\u0301"], 1.0, 1.0),  # composed vs decomposed accent
    ("the", ["a"], 1.0, 1.0),  # both normalise to the empty string
    ("1988 season", ["1988", "the 1988 world series"], 0.0, 2 / 3),
])
def test_em_and_f1_by_hand(pred, golds, em, f1):
    assert metrics.exact_match(pred, golds) == em
    assert metrics.f1_score(pred, golds) == pytest.approx(f1)


def test_regex_and_recall():
    assert metrics.regex_match("Jimmy Carter was president", [r"(Jimmy )?Carter"]) == 1.0
    assert metrics.regex_match("president Carter", [r"Carter"]) == 0.0
    assert metrics.regex_match("x", ["(unbalanced"]) == 0.0
    passages = ["Nothing here.", "The novel was written by Jane Austen in 1813."]
    assert metrics.recall_at_k(passages, ["Jane Austen"], 1) == 0.0
    assert metrics.recall_at_k(passages, ["jane austen"], 2) == 1.0
    assert not metrics.has_answer("Austenite steel", ["Austen"])  # whole words only


def test_readers(tmp_path):
    nq = tmp_path / "nq.jsonl"
    nq.write_text('{"question": "q1", "answer": ["a1", "b1"]}\n{"question": "q2", "answer": []}\n{bad\n')
    with pytest.raises(CorpusError, match=rf"{nq}:3: malformed JSON"):
        read_qa(nq)
    report = QAReport()
    got = read_qa(nq, on_error="skip", report=report)
    assert [(e.question, e.answers) for e in got] == [("q1", ("a1", "b1"))]
    assert report.skipped_no_answer == 1 and report.skipped_malformed == 1
    wq = tmp_path / "wq.json"
    wq.write_text(json.dumps([{"qId": "w1", "qText": "who?", "answers": ["x"]},
                              {"utterance": "old style?", "targetValue": '(list (description "Y Z"))'}]))
    assert [(e.id, e.question, e.answers) for e in read_qa(wq)] == [("w1", "who?", ("x",)),
                                                                    ("1", "old style?", ("Y Z",))]
    tq = tmp_path / "tq.json"
    tq.write_text(json.dumps({"Data": [{"QuestionId": "t1", "Question": "what?",
                                        "Answer": {"Value": "V", "Aliases": ["V", "W"]}}]}))
    assert read_qa(tq)[0].answers == ("V", "W")
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"answer": ["x"]}\n')
    with pytest.raises(CorpusError, match=rf"{missing}:1: record has no question"):
        read_qa(missing)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/qa not present")
def test_shared_files():
    assert len(read_qa(SHARED / "nq-open.dev.jsonl")) == 3610
    assert len(read_qa(SHARED / "webquestions.train.json")) == 2834


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("fmt, text", [
    ("jsonl", '{"question": "q", "answer": ' + DEEP + "}\n"),
    ("jsonl", DEEP + "\n"),
    ("webquestions", DEEP),
    ("triviaqa", '{"Data": ' + DEEP + "}"),
    ("curatedtrec", "question\t" + DEEP + "\n"),
])
def test_json_nested_100000_deep_is_one_error_naming_the_file(tmp_path, fmt, text):
    path = tmp_path / "deep.txt"
    path.write_text(text)
    with pytest.raises(CorpusError, match="deep.txt"):
        read_qa(path, fmt)


def test_deep_json_in_corpus_update_and_training_readers(tmp_path):
    from rag.config import CorpusConfig
    from rag.retrieval.passages import ReadReport, read_corpus

    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "a", "text": ' + DEEP + "}\n")
    with pytest.raises(CorpusError, match="corpus.jsonl:1"):
        list(read_corpus(CorpusConfig(format="jsonl", path=str(path)), ReadReport()))
    report = ReadReport()
    assert list(read_corpus(CorpusConfig(format="jsonl", path=str(path), on_error="skip"), report)) == []
    assert report.skipped_malformed == 1


@pytest.mark.parametrize("answer, words", [
    ({"paris": 1}, "answers must be a list of strings"),
    ([["paris"]], "answers must be a list of strings"),
    ([True], "answers must be a list of strings"),
])
def test_answers_that_are_not_strings_are_malformed(tmp_path, answer, words):
    """An answer given as an object once became its key as gold."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": answer}) + "\n")
    with pytest.raises(CorpusError, match=f"qa.jsonl:1: {words}"):
        read_qa(path)
    assert read_qa(path, on_error="skip") == []


def test_a_number_answer_is_read_as_text(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": 1984}) + "\n")
    assert read_qa(path)[0].answers == ("1984",)


def test_an_invalid_curatedtrec_pattern_is_an_error_not_a_miss(tmp_path):
    path = tmp_path / "trec.tsv"
    path.write_text('what year?\t["19(84"]\n')
    with pytest.raises(CorpusError, match=r"trec.tsv:1: answer pattern '19\(84' is not a regular expression"):
        read_qa(path)
