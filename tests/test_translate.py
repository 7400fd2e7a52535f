"""eval.translate: few-shot prompts, one line per question, answers kept, a rerun resumes."""

import json

import pytest

from eval import translate
from rag import translate as lib
from tests.conftest import DOCS, build_cfg, rag_config, write_jsonl


def test_prompt_ends_at_the_target_language_and_the_shots_are_not_evaluation_questions():
    p = lib.prompt("who wrote quo vadis", "en", "pl")
    assert p.endswith("English: who wrote quo vadis\nPolish:")
    assert p.count("English:") == len(lib.SHOTS["pl"]) + 1
    shots = {e for lang in lib.SHOTS.values() for e, _ in lang}
    parallel = translate.Path("../shared/data/qa/nq-open.dev.200.ru-pl-pt.jsonl")
    evaluated = {json.loads(line)["question"] for line in parallel.read_text().splitlines()} \
        if parallel.is_file() else set()
    assert not shots & evaluated
    assert set(lib.NAMES) == set(lib.SHOTS) | {"en"}
    back = lib.prompt("kto napisał quo vadis", "pl", "en")
    assert back.endswith("Polish: kto napisał quo vadis\nEnglish:") and "Polish: kto napisał powieść" in back
    assert lib.first_line("  kto napisał\nEnglish: next") == "kto napisał"


def test_translates_keeps_answers_and_resumes(tmp_path, tiny_lms):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"who wrote book {i}", "answer": [f"Author {i}"]}
                                               for i in range(5)])
    out = tmp_path / "pl.jsonl"
    args = ["--data", f"{data}[1:]", "--to", "pl", "--out", str(out), "--model", str(tiny_lms["llama"]),
            "--batch-size", "2"]
    assert translate.main(args + ["--limit", "3"]) == 0  # a sample of 3 of rows 1-4
    rows = _rows(out)
    assert len(rows) == 3 and all(r["lang"] == "pl" and r["from"] == "en" and r["question"] for r in rows)
    assert len({r["source"] for r in rows}) == 3
    assert {r["source"] for r in rows} <= {f"who wrote book {i}" for i in range(1, 5)}  # rows 1 on only
    assert all(r["answer"] == [f"Author {r['source'].split()[-1]}"] for r in rows)
    out.unlink()
    assert translate.main(args) == 0  # no limit: every row, in file order
    whole = _rows(out)
    assert [r["source"] for r in whole] == [f"who wrote book {i}" for i in range(1, 5)]
    text = out.read_text(encoding="utf-8")
    out.write_text(text[:text.index("\n") + 1] + text[text.index("\n") + 1:][:10], encoding="utf-8")  # a crash
    assert translate.main(args) == 0  # resumes after the one whole line, writing the cut one again
    assert _rows(out) == whole


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_unknown_language_is_one_line(tmp_path, capsys):
    assert translate.main(["--data", "x.jsonl", "--to", "de", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "known: en, pl, ru, pt" in capsys.readouterr().err
    assert translate.main(["--data", "x.jsonl", "--from", "pl", "--to", "ru", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "one side must be English" in capsys.readouterr().err
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "who wrote it", "answer": ["Someone"]}])
    missing = tmp_path / "no-model"
    assert translate.main(["--data", str(data), "--to", "pl", "--out", str(tmp_path / "o.jsonl"),
                           "--model", str(missing)]) == 2
    assert f"--model='{missing}' cannot be loaded" in capsys.readouterr().err  # the model's own setting, named in its error


def test_query_translation_searches_the_question_and_its_english(tmp_path, tiny_bert, tiny_lms):
    pytest.importorskip("bm25s")
    from index_builder.build import build
    from rag.config import ConfigError, QueryTranslationConfig
    from rag.model import LossSettings
    from rag.pipeline import RagPipeline

    built = build(build_cfg(tmp_path, tiny_bert, write_jsonl(tmp_path / "corpus.jsonl", DOCS), "sparse.kind=bm25"),
                  progress=False)
    lm = str(tiny_lms["llama"])
    pipe = RagPipeline.load(rag_config(built, tiny_bert, lm, retrieval="bm25",
                                       query_translation=QueryTranslationConfig(source="pl", model=lm)))
    retriever = pipe.model.retriever
    assert isinstance(retriever.translator, lib.Translator) and retriever.translator.src == "pl"
    assert len(retriever.translator(["kto napisał", "gdzie jest paryż"])) == 2  # one line each from the real LM
    retriever.translator = lambda qs: ["capital of france paris" for _ in qs]  # a translator that knows
    assert pipe.retrieve("stolica francji", 3)[0][0].title == "Paris"  # BM25 found it through the English words
    assert retriever.searched(["stolica francji"]) == (["stolica francji / capital of france paris"], None)
    read = []
    generator = pipe.model.generator
    prepare = generator.prepare
    generator.prepare = lambda questions, passages: read.append(list(questions)) or prepare(questions, passages)
    assert pipe.answer("stolica francji").question == "stolica francji"
    assert read[-1] == ["stolica francji"]  # the reader reads it as asked...
    for reader, reads in (("both", "stolica francji / capital of france paris"),  # ...or with query_translation.reader
                          ("translation", "capital of france paris")):  # both, or the translation alone
        retriever.reader = reader
        assert pipe.answer("stolica francji").question == "stolica francji"
        assert read[-1] == [reads]
        pipe.model(["stolica francji", "stolica francji"], ["paris", "paris"], LossSettings("token", 2))
        assert read[-1] == [reads, reads]  # training reads what decoding reads
    retriever.translator = None
    assert "Paris" not in [h.title for h in pipe.retrieve("stolica francji", 3)[0]]
    both = RagPipeline.load(rag_config(built, tiny_bert, lm,
                                       query_translation=QueryTranslationConfig("pl", lm, "translation")))
    assert both.model.retriever.reader == "translation" and not retriever.translator
    asked = RagPipeline.load(rag_config(built, tiny_bert, lm, query_translation=QueryTranslationConfig(None, lm, "both")))
    assert asked.model.retriever.reader == "question"  # nothing to translate: read as asked
    for source, says in (("de", "known: en, pl, ru, pt"), ("en", "one side must be English")):
        with pytest.raises(ConfigError, match=f"query_translation.source.*{says}"):
            RagPipeline.load(rag_config(built, tiny_bert, lm, query_translation=QueryTranslationConfig(source)))
