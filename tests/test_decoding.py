import pytest
import torch

from rag.config import DecodingConfig
from rag.generation import decoding
from rag.generation.generator import Contexts
from rag.generation.marginal import doc_logprobs
from tests.hf_rag import hf_rag, random_contexts, tiny_seq2seq_generator

B, K, NEW = 2, 3, 8


def strip(row: list[int]) -> tuple[int, ...]:
    """A transformers output row -> generated tokens: drop the decoder start, cut after EOS."""
    row = row[1:]
    return tuple(row[: row.index(2) + 1] if 2 in row else row)


@pytest.fixture(scope="module", params=[0.0, 3.0], ids=["rare-eos", "early-eos"])
def setup(request):
    """A tiny random BART; with a bias on EOS, hypotheses finish at different steps (exercising the finishing
    and early-stop rules of beam search)."""
    gen = tiny_seq2seq_generator()
    gen.model.final_logits_bias[0, 2] = request.param
    ids, mask, doc_scores = random_contexts(B, K)
    return gen, ids, mask, doc_scores


@pytest.mark.parametrize("beams", [1, 4])
def test_rag_token_matches_transformers(setup, beams):
    gen, ids, mask, doc_scores = setup
    rag = hf_rag(gen.model, "token", K)
    with torch.no_grad():
        expected = rag.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores, n_docs=K,
                                num_beams=beams, max_length=NEW + 1, num_return_sequences=1)
    cfg = DecodingConfig(num_beams=beams, max_new_tokens=NEW)
    ours = decoding.rag_token(gen, Contexts(ids, mask), doc_logprobs(doc_scores), cfg)
    assert [h[0].tokens for h in ours] == [strip(r) for r in expected.tolist()]


@pytest.mark.parametrize("beams", [1, 4])
def test_rag_sequence_thorough_matches_transformers(setup, beams):
    gen, ids, mask, doc_scores = setup
    rag = hf_rag(gen.model, "sequence", K)
    # min_new_tokens=2: transformers adds log p(z|x) at the second target position, so it drops the passage prior
    # for a one-token answer (EOS alone) and overrates it; eq. 1, which we follow, has no such case.
    with torch.no_grad():
        expected = rag.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores, n_docs=K,
                                num_beams=beams, max_length=NEW + 1, num_return_sequences=1, min_new_tokens=2)
    cfg = DecodingConfig(num_beams=beams, max_new_tokens=NEW, min_new_tokens=2)
    ours = decoding.rag_sequence(gen, Contexts(ids, mask), doc_logprobs(doc_scores), cfg)
    assert [h[0].tokens for h in ours] == [strip(r) for r in expected.tolist()]


def test_beam_search_of_one_passage_matches_plain_generate(setup):
    gen, ids, mask, _ = setup
    with torch.no_grad():
        expected = gen.model.generate(input_ids=ids, attention_mask=mask, num_beams=4, num_return_sequences=4,
                                      max_length=NEW + 1, length_penalty=0.5)
    cfg = DecodingConfig(num_beams=4, max_new_tokens=NEW, num_return_sequences=4, length_penalty=0.5)
    ours = decoding.search(decoding.RowStepper(gen, Contexts(ids, mask), torch.arange(B * K), 4), B * K, cfg, gen)
    assert [h.tokens for hs in ours for h in hs] == [strip(r) for r in expected.tolist()]


def test_fast_decoding_scores_only_from_own_beams(setup):
    gen, ids, mask, doc_scores = setup
    cfg = DecodingConfig(num_beams=2, max_new_tokens=NEW, sequence_decoding="fast", num_return_sequences=3)
    fast = decoding.rag_sequence(gen, Contexts(ids, mask), doc_logprobs(doc_scores), cfg)
    thorough = decoding.rag_sequence(gen, Contexts(ids, mask), doc_logprobs(doc_scores),
                                     DecodingConfig(num_beams=2, max_new_tokens=NEW, num_return_sequences=3))
    shared = 0
    for f, t in zip(fast, thorough, strict=True):
        t_scores = {h.tokens: h.score for h in t}
        for h in f:  # a lower bound on the thorough marginal: passages whose beams missed y count 0
            if h.tokens in t_scores:
                shared += 1
                assert h.score <= t_scores[h.tokens] + 1e-4
    assert shared >= len(fast)  # both keep each question's best beams: the bound was checked, not skipped


def test_min_new_tokens_and_length_limit(setup):
    gen, ids, mask, doc_scores = setup
    cfg = DecodingConfig(num_beams=1, max_new_tokens=5, min_new_tokens=4)
    for h in decoding.rag_token(gen, Contexts(ids, mask), doc_logprobs(doc_scores), cfg):
        assert 4 <= len(h[0].tokens) <= 5 and 2 not in h[0].tokens[:4]


def test_rescoring_in_passes_equals_one_pass(setup, monkeypatch):
    """RAG-sequence rescores its hypotheses a bounded number of rows at a time: the scores do not depend on it."""
    gen, ids, mask, doc_scores = setup
    cfg = DecodingConfig(num_beams=3, max_new_tokens=NEW, num_return_sequences=4)
    monkeypatch.setattr(decoding, "RESCORE_ROWS", 10_000)
    whole = decoding.rag_sequence(gen, Contexts(ids, mask), doc_logprobs(doc_scores), cfg)
    monkeypatch.setattr(decoding, "RESCORE_ROWS", 1)
    passes = decoding.rag_sequence(gen, Contexts(ids, mask), doc_logprobs(doc_scores), cfg)
    assert [[h.tokens for h in hs] for hs in whole] == [[h.tokens for h in hs] for hs in passes]
    assert all(len(hs) > 1 for hs in whole)  # several hypotheses were rescored
    for a, b in zip(whole, passes, strict=True):
        assert torch.allclose(torch.tensor([h.score for h in a]), torch.tensor([h.score for h in b]), atol=1e-5)


def test_greedy_lets_finished_questions_leave_the_batch(monkeypatch):
    """Questions that emitted EOS stop being decoded (their rows leave the cache); the others' tokens are those of
    transformers' generate, which decodes every row to the end."""
    gen = tiny_seq2seq_generator()
    ids, mask, doc_scores = random_contexts(4, K)
    kept = []
    keep = decoding.TokenStepper.keep
    monkeypatch.setattr(decoding.TokenStepper, "keep", lambda self, index: (kept.append(index.tolist()),
                                                                              keep(self, index))[1])
    for bias in torch.linspace(0, 6, 13).tolist():  # an EOS bias at which the 4 questions finish at different steps
        gen.model.final_logits_bias[0, 2] = bias
        kept.clear()
        ours = decoding.rag_token(gen, Contexts(ids, mask), doc_logprobs(doc_scores),
                                  DecodingConfig(num_beams=1, max_new_tokens=NEW))
        if len({len(h[0].tokens) for h in ours}) > 2:
            break
    assert kept, "no EOS bias made the questions finish at different steps"
    with torch.no_grad():
        expected = hf_rag(gen.model, "token", K).generate(context_input_ids=ids, context_attention_mask=mask,
                                                          doc_scores=doc_scores, n_docs=K, num_beams=1,
                                                          max_length=NEW + 1)
    assert [h[0].tokens for h in ours] == [strip(r) for r in expected.tolist()]
