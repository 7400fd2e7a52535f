"""A training step (forward + backward) against transformers' RAG classes on identical weights.

    python -m benchmarks.bench_train [--mode sequence|token] [--precisions float32,bfloat16]

bart-base-shaped random BART generator, BERT-base-shaped random question encoder, B=2 questions, K=5 passages of
128 tokens, 16 target tokens. Doc scores are q(x)ᵀd(z) against fixed passage vectors in both systems, so the
gradient reaches the question encoder the same way. The loss and every gradient are compared; each system's step
time is the best of three alternated runs and its peak memory is measured in a process of its own: the second step's
peak RSS above the RSS before it, with glibc's mmap threshold fixed so that freed tensors leave RSS (otherwise the
allocator's retained heap and the first step's code pages blur the figure). The gradients themselves (949 MiB of
fp32 for these 250M parameters) are a floor both systems share; "activations" is the peak above them. Each
precision is a step as the trainer takes it: float32 weights, bfloat16 through autocast (accelerate's mixed
precision), for both systems.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from benchmarks.common import machine, matmul_gflops, table

B, K, S, T = 2, 5, 128, 16


def build(seed: int = 0):
    from transformers import BertConfig, BertModel

    from benchmarks.bench_generate import bart_base

    bart = bart_base(dropout=0.0)
    torch.manual_seed(seed)
    qenc = BertModel(BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=3072, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    g = torch.Generator().manual_seed(seed)
    data = {
        "questions": torch.randint(1000, 20000, (B, 24), generator=g),
        "docs": torch.randn(B, K, 768, generator=g) / 20,
        "contexts": torch.randint(3, 50000, (B * K, S), generator=g),
        "labels": torch.cat([torch.full((B, 1), 2), torch.randint(3, 50000, (B, T - 1), generator=g)], 1),
    }
    return bart.train(), qenc.train(), data  # training mode without dropout: both compute the same function


def step_transformers(bart, qenc, data, mode):
    from tests.hf_rag import hf_rag

    rag = hf_rag(bart, mode, K).train()
    q = qenc(input_ids=data["questions"]).pooler_output  # (B, D)
    doc_scores = torch.einsum("bkd,bd->bk", data["docs"], q)
    out = rag(context_input_ids=data["contexts"], context_attention_mask=torch.ones_like(data["contexts"]),
              doc_scores=doc_scores, labels=data["labels"], n_docs=K, reduce_loss=True)
    out.loss.backward()
    return out.loss


def step_ours(bart, qenc, data, mode, checkpointing=False):
    from rag.config import GeneratorConfig
    from rag.generation import marginal
    from rag.generation.generator import Contexts, Seq2SeqGenerator
    from tests.hf_rag import tiny_tokenizer

    gen = Seq2SeqGenerator(bart, tiny_tokenizer(), GeneratorConfig(name="bart-base-random", family="seq2seq"))
    if checkpointing:
        bart.gradient_checkpointing_enable()
        qenc.gradient_checkpointing_enable()
    q = qenc(input_ids=data["questions"]).pooler_output
    doc_scores = torch.einsum("bkd,bd->bk", data["docs"], q)
    targets = torch.cat([data["labels"][:, 1:], torch.full((B, 1), 1)], 1)  # shifted left, as transformers
    mask = (targets != 1).float()
    ctx = Contexts(data["contexts"], torch.ones_like(data["contexts"]))
    logits = gen.teacher_force(ctx, torch.arange(B * K), targets.repeat_interleave(K, 0))  # (B·K, T, V)
    lp, _ = marginal.gather_target_logprobs(logits, targets.repeat_interleave(K, 0), vocab_sum=False)
    lp = lp.view(B, K, T)
    doc_lp = marginal.doc_logprobs(doc_scores)
    loss = (marginal.rag_sequence_loss(lp, doc_lp, mask) if mode == "sequence"
            else marginal.rag_token_loss(lp, doc_lp, mask)).sum()
    loss.backward()
    return loss


def grads(*modules) -> dict:
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
            if p.grad is not None}


def autocast(precision: str):
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[precision]
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def peak(system: str, mode: str, precision: str) -> float:
    """Peak memory a training step adds on top of the models and data, measured in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--mode", mode, "--peak", system,
                          "--precisions", precision], capture_output=True, text=True, check=True, env=env).stdout
    peak_mib, grads_mib = out.split()[-2:]
    return float(peak_mib), float(grads_mib)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_child(system: str, mode: str, precision: str) -> None:
    import gc

    bart, qenc, data = build()

    def step():
        with autocast(precision):
            _step(system)

    def _step(system):
        if system == "hf":
            step_transformers(bart, qenc, data, mode)
        else:
            step_ours(bart, qenc, data, mode, checkpointing=system == "ours+ckpt")

    step()  # warm-up: pages in the kernels' code and thread pools, which are no part of a step's memory
    bart.zero_grad(set_to_none=True)
    qenc.zero_grad(set_to_none=True)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    grads_mib = sum(p.grad.numel() * p.grad.element_size() for m in (bart, qenc) for p in m.parameters()
                    if p.grad is not None) / 2**20
    print((_status_kib("VmHWM") - before) / 1024, grads_mib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["sequence", "token"], default="sequence")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precisions", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # internal: one step in a fresh process
    args = ap.parse_args()
    if args.peak:
        return _peak_child(args.peak, args.mode, args.precisions)
    precisions = args.precisions.split(",")
    rate = matmul_gflops()

    bart, qenc, data = build()
    loss_hf = step_transformers(bart, qenc, data, args.mode)
    g_hf = grads(bart, qenc)
    bart.zero_grad(set_to_none=True)
    qenc.zero_grad(set_to_none=True)
    loss_ours = step_ours(bart, qenc, data, args.mode)
    g_ours = grads(bart, qenc)
    same_loss = torch.allclose(loss_hf, loss_ours, rtol=1e-4, atol=1e-4)
    # relative to the largest gradient: some (attention key biases) are zero in exact arithmetic, noise in floats
    scale = max(g.abs().max().item() for g in g_hf.values())
    worst = max((g_hf[k] - g_ours[k]).abs().max().item() for k in g_hf) / scale
    same_grads = set(g_hf) == set(g_ours) and worst < 1e-4

    systems = {"hf": lambda: step_transformers(bart, qenc, data, args.mode),
               "ours": lambda: step_ours(bart, qenc, data, args.mode),
               "ours+ckpt": lambda: step_ours(bart, qenc, data, args.mode, True)}
    runs = [(name, p) for p in precisions for name in systems]
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, p in runs:
            bart.zero_grad(set_to_none=True)
            qenc.zero_grad(set_to_none=True)
            t = time.perf_counter()
            with autocast(p):
                systems[name]()
            best[name, p] = min(best[name, p], time.perf_counter() - t)
            bart.gradient_checkpointing_disable()
            qenc.gradient_checkpointing_disable()
    mem = {run: peak(*run[:1], args.mode, run[1]) for run in runs}
    act = {run: mem[run][0] - mem[run][1] for run in runs}
    base = ("hf", precisions[0])
    rows = [{"system": name, "precision": p, "step s": best[name, p], "speed-up": best[base] / best[name, p],
             "vs float32 same system": best[name, precisions[0]] / best[name, p],
             "step peak MiB": mem[name, p][0], "memory / transformers": mem[name, p][0] / mem[base][0],
             "activations MiB": act[name, p], "activations / transformers": act[name, p] / act[base]}
            for name, p in runs]
    print(f"machine: {machine()}; fp32 matmul {rate:.1f} GFLOP/s; RAG-{args.mode}, B={B}, K={K}, {S}-token "
          f"contexts, {T} target tokens; loss equal: {same_loss} ({loss_hf.item():.4f} vs {loss_ours.item():.4f}); "
          f"gradients equal: {same_grads} (worst relative difference {worst:.2e})")
    print(table(rows))
    print(json.dumps({"loss_equal": bool(same_loss), "grads_equal": bool(same_grads)}))


if __name__ == "__main__":
    main()
