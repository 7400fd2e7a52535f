"""Generation against transformers' RAG classes on identical weights, side by side in one run.

    python -m benchmarks.bench_generate [--questions 8] [--new-tokens 20] [--precisions float32,bfloat16]

A bart-base-shaped random BART (6+6 layers, d=768), K=5 passages of 128 tokens per question, doc scores given
(retrieval is not timed). Each row checks that both systems return the same token ids, then times both. In each
precision both systems run on the same weights cast to it (transformers' RAG in bfloat16 too).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, matmul_gflops, table
from rag.config import DecodingConfig, GeneratorConfig
from rag.generation import decoding
from rag.generation.generator import Contexts, Seq2SeqGenerator
from rag.generation.marginal import doc_logprobs


def bart_base(vocab: int = 50265, dropout: float = 0.1):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=vocab, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
                     forced_eos_token_id=None, no_repeat_ngram_size=0, init_std=0.05, dropout=dropout,
                     attention_dropout=dropout, activation_dropout=dropout)
    return BartForConditionalGeneration(cfg).eval()


def side_by_side(fns: list, repeats: int) -> list[tuple[object, float]]:
    """Run the functions in turn `repeats` times after a warm-up; the best time of each (this machine's speed
    drifts between seconds, so alternating and taking the minimum compares like with like)."""
    outs, best = [f() for f in fns], [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            outs[i] = f()
            best[i] = min(best[i], time.perf_counter() - t)
    return list(zip(outs, best, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each system per row (best is kept)")
    ap.add_argument("--precisions", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    args = ap.parse_args()
    import sys

    sys.path.insert(0, ".")
    from tests.hf_rag import hf_rag, tiny_tokenizer

    torch.set_grad_enabled(False)
    bart = bart_base()
    gen = Seq2SeqGenerator(bart, tiny_tokenizer(), GeneratorConfig(name="bart-base-random", family="seq2seq"))
    K, L = args.docs, args.new_tokens
    g = torch.Generator().manual_seed(0)

    def inputs(B):
        ids = torch.randint(3, 50000, (B * K, 128), generator=g)
        return ids, torch.ones_like(ids), torch.randn(B, K, generator=g)

    def strip(rows):
        out = []
        for r in rows.tolist():
            r = r[1:]
            out.append(tuple(r[: r.index(2) + 1] if 2 in r else r))
        return out

    rows = []
    cases = [("RAG-token greedy", "token", 1, 1), ("RAG-token greedy", "token", 1, args.questions),
             ("RAG-token beam 4", "token", 4, args.questions), ("RAG-sequence thorough beam 4", "sequence", 4, 1)]
    first: dict = {}
    for precision, (name, mode, beams, B) in [(p, c) for p in args.precisions.split(",") for c in cases]:
        bart.to(getattr(torch, precision))
        ids, mask, scores = inputs(B)
        rag = hf_rag(bart, mode, K)
        cfg = DecodingConfig(num_beams=beams, max_new_tokens=L, min_new_tokens=L)
        run = decoding.rag_token if mode == "token" else decoding.rag_sequence
        fns = [lambda rag=rag, ids=ids, mask=mask, scores=scores, beams=beams: rag.generate(
                   context_input_ids=ids, context_attention_mask=mask, doc_scores=scores, n_docs=K, num_beams=beams,
                   max_length=L + 1, min_new_tokens=L, num_return_sequences=1),
               lambda run=run, ids=ids, mask=mask, scores=scores, cfg=cfg: run(
                   gen, Contexts(ids, mask), doc_logprobs(scores), cfg)]
        if mode == "sequence":
            fast = DecodingConfig(num_beams=beams, max_new_tokens=L, min_new_tokens=L, sequence_decoding="fast")
            fns.append(lambda ids=ids, mask=mask, scores=scores, fast=fast: decoding.rag_sequence(
                gen, Contexts(ids, mask), doc_logprobs(scores), fast))
        (theirs, t_theirs), (ours, t_ours), *rest = side_by_side(fns, args.repeats)
        same = [h[0].tokens for h in ours] == strip(theirs)
        base = first.setdefault((name, B), t_ours)  # this row's float32 time, ours
        rows.append({"decoding": name, "precision": precision, "batch": B, "transformers s/q": t_theirs / B,
                     "ours s/q": t_ours / B, "speed-up": t_theirs / t_ours, "ours vs float32": base / t_ours,
                     "same tokens": same})
        if rest:
            t_fast = rest[0][1]
            rows.append({"decoding": "RAG-sequence fast beam 4 (vs their thorough)", "precision": precision,
                         "batch": B, "transformers s/q": t_theirs / B, "ours s/q": t_fast / B,
                         "speed-up": t_theirs / t_fast, "ours vs float32": "", "same tokens": "n/a"})
    print(f"machine: {machine()}; fp32 matmul {matmul_gflops():.1f} GFLOP/s; bart-base-shaped random weights, "
          f"K={K}, 128-token contexts, {L} new tokens")
    print(table(rows))


if __name__ == "__main__":
    main()
