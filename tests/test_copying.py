import dataclasses

import pytest
import torch

from rag.copying import CopyStepper, answer_starts, answer_type
from rag.pipeline import RagPipeline
from tests.conftest import rag_config


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


@pytest.fixture(scope="module", params=["llama", "t5"])
def pipe(request, tiny_index, tiny_bert, tiny_lms):
    return RagPipeline.load(rag_config(tiny_index, tiny_bert, tiny_lms[request.param]))


@pytest.mark.parametrize("mode, beams", [("token", 1), ("token", 3), ("sequence", 1), ("sequence", 2)])
def test_copied_answers_are_passage_spans(pipe, mode, beams):
    gen = pipe.model.generator
    questions = ["what is the capital of france ?", "who wrote the novel ?", "the moon rocket"]
    answers = pipe.answer_batch(questions, mode=mode, decoding={"copy": True, "num_beams": beams,
                                                                "max_new_tokens": 5})
    free = pipe.answer_batch(questions, mode=mode, decoding={"num_beams": beams, "max_new_tokens": 5})
    assert any(a.text != f.text for a, f in zip(answers, free, strict=True))  # random weights rarely copy alone
    for a in answers:
        ids = [i for i in gen.tokenizer.convert_tokens_to_ids(list(a.tokens)) if i not in gen.eos_ids]
        assert ids, "an extractive answer has at least one token"
        spans = [gen.span_ids(p) for p in a.passages]
        assert any(_contains(s, ids) for s in spans), (a.text, a.tokens)


class _Uniform:
    """A stepper whose every next token is equally likely, over a small vocabulary (12 tokens unless told)."""

    def __init__(self, vocab: int = 12):
        self.vocab = vocab

    def start(self):
        return torch.zeros(2, self.vocab)

    def step(self, tokens):
        return torch.zeros(2, self.vocab)

    def reorder(self, index):
        pass


TEXT = {0: "</s>", 3: " a", 4: " b", 5: "c", 6: " d", 7: " x", 8: " ", 9: "1", 10: "9", 11: '"'}.get


def _allowed(lp) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in lp]


def test_copy_mask_follows_the_span():
    stepper = CopyStepper(_Uniform(), spans=[[[3, 4, 5], [4, 6, 0]], [[]]], eos=[0], text=TEXT)
    lp = stepper.start()
    assert _allowed(lp)[0] == [3, 4, 6]  # any passage word's first token; "c" is inside " bc", "</s>" no word
    assert torch.isfinite(lp[1]).all()  # no passage: no constraint
    lp = stepper.step(torch.tensor([4, 7]))
    assert _allowed(lp)[0] == [0, 5, 6]  # continue either span, or stop: " b" ends a word in the second
    lp = stepper.step(torch.tensor([6, 7]))
    assert _allowed(lp)[0] == [0]  # only the end follows


def test_copied_answers_start_and_end_at_words():
    stepper = CopyStepper(_Uniform(), spans=[[[8, 9, 10, 11]], [[3, 4, 11, 5]]], eos=[0], text=TEXT,
                          questions=["x ?", "d ?"])
    assert _allowed(stepper.start()) == [[8, 9], [4, 5]]  # no quote; row 2 skips the function word " a"
    assert _allowed(stepper.step(torch.tensor([8, 4]))) == [[9], [11]]  # " " alone is no answer; " b" of 'b"c' neither
    assert _allowed(stepper.step(torch.tensor([9, 0]))) == [[10], [0]]  # "1" of "19": no end mid-number
    assert _allowed(stepper.step(torch.tensor([10, 0]))) == [[0, 11], [0]]  # "19" may end before the quote


def test_an_answer_ends_after_max_words():
    text = {0: "</s>", 1: " one", 2: " two", 3: "s", 4: " three", 5: " four"}.get
    stepper = CopyStepper(_Uniform(), spans=[[[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]]], eos=[0], text=text,
                          max_words=2)
    stepper.start()
    assert _allowed(stepper.step(torch.tensor([1, 2]))) == [[0, 2], [3]]  # one word: go on or end
    assert _allowed(stepper.step(torch.tensor([2, 3]))) == [[3], [0, 4]]  # mid-word "two|s": no end yet
    assert _allowed(stepper.step(torch.tensor([3, 4]))) == [[0], [0]]  # two words each ("one twos", "twos three")


@pytest.mark.parametrize("question, kind", [
    ("when did the first world war end", "date"), ("what year was the eiffel tower built", "date"),
    ("how many moons does mars have", "number"), ("how much does the earth weigh", "number"),
    ("who sang when a man loves a woman", "name"), ("where is the orinoco river", "name"),
    ("what is the capital of france", None), ("the largest moon of saturn", None),
])
def test_the_wh_phrase_fixes_the_answer_type(question, kind):
    assert answer_type(question) == kind


WORDS = {20: " In", 21: " 1969", 22: ",", 23: " Neil", 24: " Armstrong", 25: " walked", 26: " two", 27: " (",
         28: "July", 29: ")", 30: " moon", 31: "’s"}


def _starts(question, seq):
    return [WORDS[seq[i]].strip() for _, i in answer_starts(question, [seq], WORDS.get)]


def test_answers_start_at_a_word_of_the_asked_type():
    seq = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]  # In 1969, Neil Armstrong walked two (July) moon’s
    assert _starts("when did he walk on the moon", seq) == ["1969", "July"]
    assert _starts("how many steps", seq) == ["1969", "two"]
    assert _starts("who walked on the moon", seq) == ["Neil", "Armstrong", "July"]  # not "In", nor the asked "walked"
    assert _starts("what happened on the moon", seq) == ["1969", "Neil", "Armstrong", "walked", "two", "July"]
    assert _starts("who was there", [25, 30]) == ["walked", "moon"]  # no name anywhere: any word


def test_stop_strings_and_answer_prefix(tiny_index, tiny_bert, tiny_lms):
    base = rag_config(tiny_index, tiny_bert, tiny_lms["llama"])
    free = RagPipeline.load(base).answer("what is the capital of france ?", decoding={"max_new_tokens": 6})
    assert len(free.tokens) >= 2, "the tiny model should say more than one token unprompted"
    stop_word = free.tokens[1].lstrip("Ġ▁")
    cfg = dataclasses.replace(base, generator=dataclasses.replace(base.generator, stop=(stop_word,),
                                                                  answer_prefix=" answer :"))
    pipe = RagPipeline.load(cfg)
    gen = pipe.model.generator
    stop_id = gen.tokenizer.convert_tokens_to_ids(free.tokens[1])
    assert stop_id in gen.eos_ids and gen.eos_id != stop_id  # decoding stops there; targets still end with EOS
    assert gen.prompt("q ?", None).endswith(" answer :")
    ans = pipe.answer("what is the capital of france ?", decoding={"max_new_tokens": 6})
    assert stop_word not in ans.text.split()


def test_answers_say_whether_the_passages_support_them(pipe):
    from rag.cli import _show
    from rag.pipeline import supporting_passages

    for a in pipe.answer_batch(["what is the capital of france ?", "who wrote the novel ?"],
                               decoding={"copy": True, "max_new_tokens": 3}):
        assert a.supporting == supporting_passages(a.text, a.passages)
        assert a.support == pytest.approx(sum(a.passages[k].posterior for k in a.supporting))
        shown = _show(a)
        assert ("supported by passage" in shown) == a.supported  # "passage 2" or "passages 1, 3"
        assert ("not supported" in shown) == (not a.supporting)
    fake = dataclasses.replace(a, text="zebra", supporting=(), support=0.0)
    assert not fake.supported and "not supported" in _show(fake)


def test_an_answer_found_only_in_a_title_is_supported():
    from rag.pipeline import Passage, supporting_passages

    passages = [Passage("0", "Jane Austen", "She wrote six novels.", 1.0, 0.5, 0.5),
                Passage("1", "Pride and Prejudice", "A novel of manners by Jane Austen.", 0.5, 0.5, 0.5),
                Passage("2", "Emma", "A comic novel.", 0.1, 0.0, 0.0)]
    assert supporting_passages("jane austen", passages) == (0, 1)
    assert supporting_passages("Pride and Prejudice: A novel", passages) == (1,)  # from the title into the text
    assert supporting_passages("Emma Woodhouse", passages) == ()
    assert supporting_passages("  ", passages) == ()


def test_rag_ask_json_carries_the_support_signal(tmp_path, tiny_index, tiny_bert, tiny_lms, capsys):
    import json

    from rag.cli import main
    from rag.config import save_config

    save_config(rag_config(tiny_index, tiny_bert, tiny_lms["llama"]), tmp_path / "rag.yaml")
    assert main(["ask", "who wrote the novel ?", "--config", str(tmp_path / "rag.yaml"), "--json",
                 "--set", "decoding.copy=true"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"supported", "supporting", "support"} <= set(out)
    assert out["supported"] == (bool(out["supporting"]) and out["support"] >= 0.2)


def test_copying_from_the_best_sentences(pipe):
    import torch

    from rag.copying import focus_sentences
    from rag.metrics import has_answer
    from rag.passages import sentence_splitter

    model, gen = pipe.model, pipe.model.generator
    questions = ["what is the capital of france ?", "the novel ?"]  # no asked type: every sentence competes
    retrieved = model.retriever(questions, 3)
    ctx = model.contexts(questions, retrieved)
    focused = focus_sentences(questions, ctx.passages, model.retriever, gen.truncate, keep=2)
    split = sentence_splitter()
    for b, q in enumerate(questions):
        mine, cut = ctx.passages[b * 3 : (b + 1) * 3], focused[b * 3 : (b + 1) * 3]
        assert [p.title for p in cut] == [p.title for p in mine]
        kept = [s for p in cut for s in split(p.text)]
        assert len(kept) == 2
        assert all(s in gen.truncate(p.text) for p, c in zip(mine, cut, strict=True) for s in split(c.text))
        # the two kept are the best by the query encoder's cosine
        every = [s for p in mine for s in split(gen.truncate(p.text))]
        enc = model.retriever.encoder.tokenize(every)
        with torch.inference_mode():
            sims = model.retriever.encoder(**enc) @ model.retriever.encode([q])[0]
        assert set(kept) == {every[i] for i in sims.topk(2).indices.tolist()}
        for c in cut:  # a passage left without sentences offers its title alone, no dangling colon
            shown = gen.tokenizer.decode(gen.span_ids(c)).strip()
            if c.text:
                assert ":" in shown
            else:
                assert not shown.endswith(":")
        assert any(not c.text for c in cut)  # three passages, two sentences kept: one passage at least is cut
    for a in pipe.answer_batch(questions, decoding={"copy": True, "copy_sentences": 1, "max_new_tokens": 4}):
        assert a.text  # copied from the kept sentence or a title: a span of the passages all the same
        assert any(has_answer(f"{p.title}\n{p.text}", [a.text]) for p in a.passages)


def test_a_typed_question_reads_a_sentence_of_its_type():
    from rag.copying import focus_sentences
    from rag.pipeline import Passage

    class Retriever:  # ranks sentences by how many "moon"s they hold
        class encoder:
            device = torch.device("cpu")

            @staticmethod
            def tokenize(texts):
                return {"n": torch.tensor([[t.count("moon")] for t in texts], dtype=torch.float)}

            def __new__(cls, n):
                return torch.cat([n, torch.ones_like(n)], 1)

        @staticmethod
        def encode(questions):
            return torch.tensor([[1.0, 0.0]])

    passages = [Passage("a", "Moon", "The moon and the moon and the moon. Apollo 11 landed on the moon in 1969.",
                        1.0, 0.5, 0.5),
                Passage("b", "Armstrong", "Neil Armstrong walked on the moon.", 0.5, 0.5, 0.5)]
    pick = {q: [p.text for p in focus_sentences([q], passages, Retriever, lambda t: t, 1)]
            for q in ["when did they land on the moon", "what about the moon"]}
    assert pick["when did they land on the moon"] == ["Apollo 11 landed on the moon in 1969.", ""]
    assert pick["what about the moon"] == ["The moon and the moon and the moon.", ""]


DIGITS = {0: "</s>", 1: " area", 2: " 315", 3: ",", 4: "159", 5: " km", 6: "2", 7: " (", 8: "121", 9: ",", 10: "6",
          11: "8", 12: "4", 13: " sq", 14: " mi", 15: ").", 16: "##s"}.get


def test_no_answer_ends_inside_a_number_or_a_word_piece():
    """Digits split one by one, thousands separators and sub-word pieces: the answer ends only where the passage's
    word does (the NQ prediction '315,159 km2 (121,6' ended mid-number)."""
    seq = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # area 315,159 km2 (121,684 sq mi).
    stepper = CopyStepper(_Uniform(20), spans=[[seq], [[1, 16, 7]]], eos=[0], text=DIGITS, questions=[None, None])
    stepper.start()
    ends = []
    for t, u in zip([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [1, 16, 7] + [0] * 11, strict=True):
        lp = stepper.step(torch.tensor([t, u]))
        ends.append(bool(torch.isfinite(lp[0, 0])))
        if u == 1:  # " area" before the piece "##s": the word goes on
            assert not torch.isfinite(lp[1, 0])
    # after: 315 , 159 | km 2 | ( 121 , 6 8 4 | sq | mi | ). -- never inside "315,159", "km2" or "121,684"
    assert ends == [False, False, True, False, True, False, False, False, False, False, True, True, True, True]


def test_a_truncated_passage_never_ends_mid_word(pipe):
    gen = pipe.model.generator
    if gen.is_seq2seq:
        pytest.skip("seq2seq passages are not cut by truncate (the tokenizer truncates the joined input)")
    text = "the capital of france is paris and the seine river 315,159 and tower " * 8
    short = gen.with_config(max_context_length=13)
    for n in range(5, 40):
        cut = gen.with_config(max_context_length=n).truncate(text)
        assert text.startswith(cut) and (len(cut) == len(text.rstrip()) or text[len(cut)] == " "), (n, cut[-12:])
    assert len(short.truncate(text)) < len(text)
