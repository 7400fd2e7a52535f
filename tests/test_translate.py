"""eval.translate: few-shot prompts, one line per question, answers kept, a rerun resumes."""

import json

from eval import translate
from tests.conftest import write_jsonl


def test_prompt_ends_at_the_target_language_and_the_shots_are_not_evaluation_questions():
    p = translate.prompt("who wrote quo vadis", "pl")
    assert p.endswith("English: who wrote quo vadis\nPolish:")
    assert p.count("English:") == len(translate.SHOTS["pl"]) + 1
    shots = {e for lang in translate.SHOTS.values() for e, _ in lang}
    parallel = translate.Path("../shared/data/qa/nq-open.dev.200.ru-pl-pt.jsonl")
    evaluated = {json.loads(line)["question"] for line in parallel.read_text().splitlines()} \
        if parallel.is_file() else set()
    assert not shots & evaluated
    assert set(translate.NAMES) == set(translate.SHOTS)
    assert translate.first_line("  kto napisał\nEnglish: next") == "kto napisał"


def test_translates_keeps_answers_and_resumes(tmp_path, tiny_lms):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"who wrote book {i}", "answer": [f"Author {i}"]}
                                               for i in range(5)])
    out = tmp_path / "pl.jsonl"
    args = ["--data", f"{data}[1:]", "--to", "pl", "--out", str(out), "--model", str(tiny_lms["llama"]),
            "--batch-size", "2"]
    assert translate.main(args + ["--limit", "3"]) == 0
    rows = _rows(out)
    assert len(rows) == 3 and all(r["lang"] == "pl" and r["question"] for r in rows)
    assert {r["en"] for r in rows} <= {f"who wrote book {i}" for i in range(1, 5)}  # rows 1 on only
    assert all(r["answer"] == [f"Author {r['en'].split()[-1]}"] for r in rows)
    assert translate.main(args) == 0  # all four now: the first three are kept, one is added
    again = _rows(out)
    assert again[:3] == rows and len(again) == 4
    out.write_text(out.read_text(encoding="utf-8")[:-10], encoding="utf-8")  # a crash cut the last line
    assert translate.main(args) == 0
    assert _rows(out) == again


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_unknown_language_is_one_line(tmp_path, capsys):
    assert translate.main(["--data", "x.jsonl", "--to", "de", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "known: pl, ru, pt" in capsys.readouterr().err
