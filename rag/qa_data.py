"""Question-answer data: NQ-open / EfficientQA JSON Lines, WebQuestions JSON, TriviaQA JSON, any JSON Lines.

Shared by training (rag.train) and evaluation (eval/). Bad records are errors naming file and line, or with
`on_error="skip"` skipped and counted; questions without answers are skipped and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rag.files import parse_json
from rag.retrieval.passages import CorpusError, Skips, json_records


@dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]
    id: str = ""
    patterns: bool = False  # CuratedTREC: the answers are regular expressions


@dataclass
class QAReport(Skips):
    read: int = 0
    skipped_no_answer: int = 0


def _webquestions_answers(raw) -> list[str]:
    # WebQuestions' targetValue: '(list (description "Jazmyn Bieber") (description "Jaxon Bieber"))'
    if isinstance(raw, list):
        return [str(a) for a in raw]
    return re.findall(r'\(description "?(.*?)"?\)', str(raw))


def detect_format(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix in (".tsv", ".txt", ".csv"):
        return "curatedtrec"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        return "webquestions"
    if head.startswith(b"{") and b'"Data"' in head:
        return "triviaqa"
    return "jsonl"


def _add(out: list, report: QAReport, where: str, question, answers, on_error: str, qid: str = "",
         patterns: bool = False) -> None:
    problem = _problem(question, answers, patterns)
    if problem:
        if on_error == "raise":
            raise CorpusError(f"{where}: {problem} (set on_error: skip to skip such records)")
        report.skip(f"{where}: {problem}")
        return
    report.read += 1
    answers = tuple(str(a).strip() for a in (answers or []) if str(a).strip())
    if not answers:
        report.skipped_no_answer += 1
        return
    out.append(QAExample(question.strip(), answers, qid, patterns))


def _problem(question, answers, patterns: bool) -> str | None:
    """What makes a record unusable, or None. Answers are a list of strings (numbers are read as text): an object
    once became its keys as gold, and a pattern that does not compile once silently never matched."""
    if not isinstance(question, str) or not question.strip():
        return "record has no question"
    if answers is not None and (not isinstance(answers, list) or any(
            isinstance(a, bool) or not isinstance(a, (str, int, float)) for a in answers)):
        return f"answers must be a list of strings, got {str(answers)[:80]}"
    for a in (answers or []) if patterns else []:
        try:
            re.compile(a)
        except re.error as e:
            return f"answer pattern {a!r} is not a regular expression ({e})"
    return None


def data_rows(entry: str | Path) -> tuple[Path, slice]:
    """"file.jsonl[500:]" -> (file.jsonl, rows 500 on): a part of a file (e.g. all but the evaluation rows); a file
    whose own name ends so is read whole."""
    m = re.fullmatch(r"(.+)\[(\d*):(\d*)\]", str(entry))
    if not m or Path(entry).expanduser().is_file():
        return Path(entry).expanduser(), slice(None)
    return Path(m[1]).expanduser(), slice(int(m[2]) if m[2] else None, int(m[3]) if m[3] else None)


def read_qa(path: str | Path, fmt: str = "auto", on_error: str = "raise", question_field: str = "question",
            answer_field: str = "answer", report: QAReport | None = None) -> list[QAExample]:
    """Read a QA file, or some of its rows ("file.jsonl[500:]": the questions with answers from the 501st on);
    `fmt` is jsonl (NQ-open style, configurable fields), webquestions, triviaqa, curatedtrec (DPR's TSV: question,
    then a JSON list of answer regular expressions) or auto (by extension and content)."""
    path, rows = data_rows(path)
    return _read_qa(path, fmt, on_error, question_field, answer_field, report)[rows]


def _read_qa(path: Path, fmt: str, on_error: str, question_field: str, answer_field: str,
             report: QAReport | None) -> list[QAExample]:
    report = report if report is not None else QAReport()
    if not path.is_file():
        raise CorpusError(f"QA file {path} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    out: list[QAExample] = []
    if fmt == "jsonl":
        for number, where, rec in json_records(path, on_error, report.skip):
            answers = rec.get(answer_field, rec.get("answers"))
            answers = [answers] if isinstance(answers, (str, int, float)) and not isinstance(answers, bool) \
                else answers
            _add(out, report, where, rec.get(question_field), answers, on_error, str(rec.get("id", number)))
        return out
    if fmt == "curatedtrec":
        _read_curatedtrec(path, out, report, on_error)
        return out
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
    except ValueError as e:
        raise CorpusError(f"{path}:{getattr(e, 'lineno', 1)}: malformed JSON ({getattr(e, 'msg', e)})") from None
    if fmt == "webquestions":
        for i, rec in enumerate(data):
            answers = rec.get("answers") or _webquestions_answers(rec.get("targetValue", ""))
            _add(out, report, f"{path} record {i}", rec.get("qText", rec.get("utterance")), answers, on_error,
                 str(rec.get("qId", i)))
    elif fmt == "triviaqa":
        for i, rec in enumerate(data.get("Data", [])):
            ans = rec.get("Answer") or {}
            answers = [ans.get("Value"), *(ans.get("Aliases") or []), *(ans.get("NormalizedAliases") or [])]
            _add(out, report, f"{path} record {i}", rec.get("Question"), list(dict.fromkeys(
                a for a in answers if a)), on_error, str(rec.get("QuestionId", i)))
    else:
        raise CorpusError(f"unknown QA format {fmt!r}: use jsonl, webquestions, triviaqa, curatedtrec or auto")
    return out


def _read_curatedtrec(path: Path, out: list, report: QAReport, on_error: str) -> None:
    """DPR's CuratedTREC files: `question<TAB>["pattern", ...]` per line (a Python list literal is accepted too)."""
    import ast

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        question, tab, raw = line.partition("\t")
        answers = None
        if tab:
            try:
                answers = parse_json(raw)
            except ValueError:
                try:
                    answers = ast.literal_eval(raw)  # literals only: no code runs
                except (ValueError, SyntaxError, RecursionError, MemoryError):
                    answers = None
        if not isinstance(answers, list):
            message = f"{where}: expected 'question<TAB>[answer patterns]'"
            if on_error == "raise":
                raise CorpusError(message + " (set on_error: skip to skip such records)")
            report.skip(message)
            continue
        _add(out, report, where, question, answers, on_error, str(number), patterns=True)
