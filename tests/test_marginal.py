import itertools

import pytest
import torch

from rag.generation import marginal
from tests.hf_rag import hf_rag, tiny_bart


def random_case(B=2, K=3, T=4, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, T, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (B, T), generator=g)
    doc_scores = torch.randn(B, K, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, -1] = 0  # padding
    return logits, targets, doc_scores, mask


def test_against_brute_force_in_probability_space():
    logits, targets, doc_scores, mask = random_case()
    B, K, T, V = logits.shape
    probs = torch.softmax(logits, -1)
    p_doc = torch.softmax(doc_scores, -1)
    lp, _ = marginal.gather_target_logprobs(logits.reshape(B * K, T, V),
                                            targets.repeat_interleave(K, 0))
    lp = lp.view(B, K, T)
    doc_lp = marginal.doc_logprobs(doc_scores).double()
    seq = marginal.rag_sequence_loss(lp, doc_lp, mask)
    tok = marginal.rag_token_loss(lp, doc_lp, mask)
    for b in range(B):
        n = int(mask[b].sum())
        # RAG-sequence: p(y|x) = Σ_z p(z|x) Π_t p(y_t|x,z,y<t)
        p_seq = sum(p_doc[b, z] * torch.prod(torch.stack([probs[b, z, t, targets[b, t]] for t in range(n)]))
                    for z in range(K))
        # RAG-token: p(y|x) = Π_t Σ_z p(z|x) p(y_t|x,z,y<t)
        p_tok = torch.prod(torch.stack([sum(p_doc[b, z] * probs[b, z, t, targets[b, t]] for z in range(K))
                                        for t in range(n)]))
        torch.testing.assert_close(seq[b], -torch.log(p_seq))
        torch.testing.assert_close(tok[b], -torch.log(p_tok))


def test_posteriors_sum_to_one_and_follow_bayes():
    logits, targets, doc_scores, mask = random_case()
    B, K, T, V = logits.shape
    lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None, :, None].expand(B, K, T, 1)).squeeze(-1)
    doc_lp = marginal.doc_logprobs(doc_scores).double()
    post = marginal.token_posteriors(lp, doc_lp)
    torch.testing.assert_close(post.sum(1), torch.ones(B, T, dtype=torch.float64))
    joint = torch.softmax(doc_scores, -1)[:, :, None] * lp.exp()
    torch.testing.assert_close(post, joint / joint.sum(1, keepdim=True))
    seq_post = marginal.sequence_posteriors(lp, doc_lp, mask)
    torch.testing.assert_close(seq_post.sum(1), torch.ones(B, dtype=torch.float64))


def test_a_single_passage_reduces_to_plain_likelihood():
    logits, targets, _, mask = random_case(K=1)
    B, K, T, V = logits.shape
    lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None, :, None]).squeeze(-1)
    doc_lp = torch.zeros(B, 1, dtype=torch.float64)
    expected = -(lp[:, 0] * mask).sum(-1)
    torch.testing.assert_close(marginal.rag_sequence_loss(lp, doc_lp, mask), expected)
    torch.testing.assert_close(marginal.rag_token_loss(lp, doc_lp, mask), expected)


def test_smoothing_needs_its_inputs():
    logits, targets, doc_scores, mask = random_case()
    lp = torch.zeros(2, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="vocab_sum"):
        marginal.rag_sequence_loss(lp, doc_scores, mask, smoothing=0.1)
    with pytest.raises(ValueError, match="full"):
        marginal.rag_token_loss(lp, doc_scores, mask, smoothing=0.1)


@pytest.mark.parametrize("kind, epsilon", list(itertools.product(["sequence", "token"], [0.0, 0.1])))
def test_equals_transformers_rag_loss(kind, epsilon):
    """Identical BART weights, contexts, doc scores and labels: the same loss as transformers' RAG classes."""
    B, K, S, T = 2, 3, 7, 5
    bart = tiny_bart()
    rag = hf_rag(bart, kind, K)
    g = torch.Generator().manual_seed(1)
    contexts = torch.randint(3, 64, (B * K, S), generator=g)
    context_mask = torch.ones_like(contexts)
    context_mask[1, -2:] = 0
    doc_scores = torch.randn(B, K, generator=g)
    labels = torch.randint(3, 64, (B, T), generator=g)
    labels[:, 0] = 2  # decoder start
    labels[1, -1] = 1  # a padded target
    with torch.no_grad():
        out = rag(context_input_ids=contexts, context_attention_mask=context_mask, doc_scores=doc_scores,
                  decoder_input_ids=labels, n_docs=K)
        expected = rag.get_nll(out.logits, doc_scores, labels, epsilon=epsilon, n_docs=K)
        # ours: teacher forcing with the same decoder inputs; targets are the labels shifted left
        logits = bart(input_ids=contexts, attention_mask=context_mask,
                      decoder_input_ids=labels.repeat_interleave(K, 0)).logits  # (B*K, T, V)
        targets = torch.cat([labels[:, 1:], torch.full((B, 1), 1)], 1)  # (B, T)
        mask = (targets != 1).float()
        lp, vocab_sum = marginal.gather_target_logprobs(logits, targets.repeat_interleave(K, 0))
        lp, vocab_sum = lp.view(B, K, T), vocab_sum.view(B, K, T)
        doc_lp = marginal.doc_logprobs(doc_scores)
        if kind == "sequence":
            ours = marginal.rag_sequence_loss(lp, doc_lp, mask, epsilon, vocab_sum, logits.shape[-1])
        else:
            full = torch.log_softmax(logits.float(), -1).view(B, K, T, -1)
            ours = marginal.rag_token_loss(lp, doc_lp, mask, epsilon, full)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_distant_supervision_loss_by_hand():
    import math

    from rag.generation.marginal import distant_supervision_loss

    scores = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.2, 0.1]], requires_grad=True)
    positive = torch.tensor([[False, True, True], [False, False, False]])
    loss = distant_supervision_loss(scores, positive, scale=10.0)
    e = [math.exp(10 * s) for s in (0.9, 0.1, 0.5)]
    assert loss[0].item() == pytest.approx(-math.log((e[1] + e[2]) / sum(e)), rel=1e-5)
    assert loss[1].item() == 0.0  # no passage holds the answer: no signal
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all() and (scores.grad[1] == 0).all()
    assert scores.grad[0, 0] > 0 > scores.grad[0, 1]  # descent lowers the negative, raises the positives
