import pytest
import torch

from rag.config import GeneratorConfig
from rag.generation.generator import CausalGenerator, Seq2SeqGenerator, load_generator
from rag.retrieval.passages import PassageRecord

P = [PassageRecord("a#0", "a", "Paris", "Paris is the capital of France."),
     PassageRecord("b#0", "b", "London", "London is the capital of England and a much longer passage about the river.")]


@pytest.fixture(scope="module", params=["llama", "gpt2", "t5"])
def gen(request, tiny_lms):
    return load_generator(GeneratorConfig(name=str(tiny_lms[request.param]), max_target_length=8))


def test_family_and_special_tokens(gen, tiny_lms):
    expected = Seq2SeqGenerator if gen.model.config.is_encoder_decoder else CausalGenerator
    assert isinstance(gen, expected)
    assert gen.pad_id is not None and gen.eos_id == 3  # GPT-2 has no pad token: EOS pads, masked out


def test_incremental_decoding_equals_teacher_forcing(gen):
    """begin/advance/reorder with the key/value cache give the same logits as one teacher-forced pass."""
    questions = ["what is the capital of france ?", "which river ?"]
    ctx = gen.prepare(questions, [P, P[::-1]])  # B=2, K=2: 4 context rows, different lengths (padding)
    targets = torch.tensor([[10, 11, 12, 3], [13, 14, 3, 0], [15, 16, 17, 18], [19, 3, 0, 0]])
    rows = torch.arange(4)
    with torch.no_grad():
        forced = gen.teacher_force(ctx, rows, targets)  # (4, T, V)
        state, logits = gen.begin(ctx, rows)
        steps = [logits]
        for t in range(targets.shape[1] - 1):
            steps.append(gen.advance(state, targets[:, t]))
    torch.testing.assert_close(torch.stack(steps, 1), forced, rtol=1e-4, atol=1e-4)


def test_reorder_follows_the_beams(gen):
    ctx = gen.prepare(["q"], [[P[0]]])
    rows = torch.zeros(3, dtype=torch.long)  # three beams over one context
    targets = torch.tensor([[10, 11], [12, 13], [14, 15]])
    with torch.no_grad():
        state, _ = gen.begin(ctx, rows)
        gen.advance(state, targets[:, 0])
        gen.reorder(state, torch.tensor([2, 2, 0]))
        got = gen.advance(state, targets[[2, 2, 0], 1])
        full = gen.teacher_force(ctx, rows, torch.cat([targets[[2, 2, 0]], torch.full((3, 1), 3)], 1))
    torch.testing.assert_close(got, full[:, 2], rtol=1e-4, atol=1e-4)


def test_prompts(tiny_lms):
    llama = load_generator(GeneratorConfig(name=str(tiny_lms["llama"])))
    prompt = llama.prompt("who ?", P[0])
    assert prompt.startswith("system: ") and "Paris: Paris is the capital of France." in prompt
    assert prompt.endswith("assistant: ")
    gpt2 = load_generator(GeneratorConfig(name=str(tiny_lms["gpt2"])))
    assert gpt2.prompt("who ?", P[0]) == "Paris: Paris is the capital of France.\n\nQuestion: who ?"
    t5 = load_generator(GeneratorConfig(name=str(tiny_lms["t5"])))
    assert t5.context_texts(["who ?"], [[P[0]]]) == ["Paris / Paris is the capital of France. // who ?"]


def test_context_truncation(tiny_lms):
    t5 = load_generator(GeneratorConfig(name=str(tiny_lms["t5"]), max_context_length=6))
    assert t5.prepare(["who ?"], [[P[1]]]).input_ids.shape[1] == 6
    llama = load_generator(GeneratorConfig(name=str(tiny_lms["llama"]), max_context_length=3))
    assert "London is the" in llama.prompt("who ?", P[1]) and "river" not in llama.prompt("who ?", P[1])


def test_target_mask_keeps_the_final_eos(gen):
    """GPT-2 pads with EOS: the mask comes from lengths, so the answer's EOS is still a target."""
    ids, mask = gen.target_ids(["paris is the capital", "paris"])
    n = [len(gen.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in ("paris is the capital", "paris")]
    assert mask.sum(1).tolist() == n
    assert [ids[i, n[i] - 1].item() for i in range(2)] == [gen.eos_id] * 2


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_a_huge_question_reaches_the_generator_bounded(tiny_lms, kind, caplog):
    """A 5,000-word question is cut to generator.max_question_length tokens, with one warning: the prompt stays
    small whatever the question (a 10,000-word one once took 7 GB)."""
    import logging

    from rag.config import GeneratorConfig
    from rag.generation.generator import load_generator
    from rag.retrieval.passages import PassageRecord

    gen = load_generator(GeneratorConfig(name=str(tiny_lms[kind]), max_context_length=20, max_question_length=12))
    passage = PassageRecord(id="p", doc_id="p", title="paris", text="paris is the capital of france " * 10)
    short = gen.prepare(["capital of france"], [[passage]]).input_ids.shape[1]
    with caplog.at_level(logging.WARNING):
        huge = gen.prepare(["the capital of france and the seine river " * 625], [[passage]])
    assert huge.input_ids.shape[1] <= short + 12 and "max_question_length=12" in caplog.text
    assert huge.questions[0] and "the capital of france".startswith(huge.questions[0][:21])


def test_targets_start_with_a_space_after_an_answer_prefix(tiny_lms):
    """After "The answer is:" the model writes " Paris": training targets carry that space (without it the loss
    taught tokens the model never produces there)."""
    from rag.config import GeneratorConfig
    from rag.generation.generator import load_generator

    plain = load_generator(GeneratorConfig(name=str(tiny_lms["llama"])))
    prefixed = load_generator(GeneratorConfig(name=str(tiny_lms["llama"]), answer_prefix="The answer is:"))
    tok = plain.tokenizer
    assert plain.target_ids(["Paris"])[0][0, :-1].tolist() == tok("Paris", add_special_tokens=False)["input_ids"]
    assert prefixed.target_ids(["Paris"])[0][0, :-1].tolist() == tok(" Paris", add_special_tokens=False)["input_ids"]


def test_the_prompt_pass_gives_the_lm_head_a_contiguous_input(gen):
    """A non-contiguous h[:, -1:] makes torch's matmul copy a frozen LM head once per row (x80 slower for
    SmolLM2 after an adapter merge, which leaves no weight requiring grad): the prompt pass must not do that."""
    if gen.is_seq2seq:
        pytest.skip("the encoder-decoder prompt pass has no LM head")
    seen = []
    head = gen.model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    try:
        gen.model.requires_grad_(False)
        with torch.inference_mode():
            gen.begin(gen.prepare(["which river ?"], [P]), torch.arange(2))
    finally:
        hook.remove()
        gen.model.requires_grad_(True)
    assert seen and all(seen)


def test_prompts_of_different_lengths_run_in_groups_each_as_if_alone(gen, monkeypatch):
    """The prompt pass runs rows of similar length together (less padding); every row's output equals that row
    run alone, unpadded."""
    from rag.generation.batching import length_groups

    monkeypatch.setattr("rag.generation.batching.GROUP_ROWS", 1)
    long = PassageRecord("c#0", "c", "Rivers", " ".join(["The Seine and the Thames are rivers."] * 6))
    ctx = gen.prepare(["which river ?", "what ?"], [[P[0], long], [P[1], P[0]]])
    lengths = ctx.attention_mask.sum(1)
    assert len(length_groups(lengths, min_rows=1)) > 1
    if not gen.is_seq2seq and gen.use_chat:
        assert ctx.shared > 0  # the chat header and system prompt run once for all rows
    with torch.inference_mode():
        if gen.is_seq2seq:
            grouped = gen.encode(ctx)
        else:
            _, grouped = gen._prefix(ctx)
        for r in range(len(lengths)):
            one = gen.prepare([ctx.questions[r // 2]], [[ctx.passages[r]]])
            if gen.is_seq2seq:
                torch.testing.assert_close(grouped[r, : lengths[r]], gen.encode(one)[0], rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(grouped[r], gen._prefix(one)[1][0], rtol=1e-4, atol=1e-4)


def test_length_groups_bound_the_padding():
    from rag.generation.batching import LENGTH_SLACK, length_groups

    lengths = torch.tensor([100, 210, 79, 205, 150, 99, 180, 211])
    groups = length_groups(lengths, min_rows=1)
    assert sorted(torch.cat(groups).tolist()) == list(range(8))
    for g in groups:
        assert lengths[g].min() >= (1 - LENGTH_SLACK) * lengths[g].max()
    assert [len(g) for g in length_groups(torch.tensor([7, 7, 7]), min_rows=1)] == [3]
    assert [len(g) for g in length_groups(lengths, min_rows=3)] == [4, 3, 1]  # 211 210 205 180 | 150 100 99 | 79


def test_shared_prefix_leaves_every_row_a_token():
    from rag.generation.batching import shared_prefix

    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3]]) == 2
    assert shared_prefix([[1, 2], [1, 2]]) == 1
    assert shared_prefix([[7], [8, 9]]) == 0
