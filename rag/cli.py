"""`rag ask QUESTION`: answer a question with the embedded default (or any RAG config) and show the provenance."""

from __future__ import annotations

import rag.program  # noqa: F401 - first: the program's process settings, before torch loads

# isort: split
import argparse
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rag", description="Retrieval-augmented generation (RAG-sequence / RAG-token).")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ask", help="answer a question, with the passages it came from",
                       description="Answer a question. The first run of the demo builds and caches its index "
                                   "(a few minutes on a CPU); later runs load everything in seconds.")
    a.add_argument("question")
    a.add_argument("--config", default=None,
                   help="RAG config YAML, or a folder written by save_pretrained or training (default: the shipped "
                        "configs/rag/demo.yaml)")
    a.add_argument("--pretrained", default=None, help="the same as --config FOLDER (kept for old scripts)")
    a.add_argument("--mode", choices=["sequence", "token"], default=None, help="RAG-sequence or RAG-token")
    a.add_argument("--n-docs", type=int, default=None, help="passages to retrieve (k)")
    a.add_argument("--beams", type=int, default=None, help="beam size (1: greedy)")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    a.add_argument("--json", action="store_true", help="print the answer and its provenance as JSON")
    sub.add_parser("serve", help="answer over HTTP with micro-batching and a page (rag serve --help)", add_help=False)
    return p


def _show(ans) -> str:
    lines = [f"Q: {ans.question}", f"A: {ans.text}    (RAG-{ans.mode}, log p = {ans.score:.3f})"]
    if ans.supported:
        titles = ", ".join(dict.fromkeys(f"[{ans.passages[k].title}]" for k in ans.supporting))
        which = ", ".join(str(k + 1) for k in ans.supporting)
        lines.append(f"   supported by passage{'s' if len(ans.supporting) > 1 else ''} {which}: {titles} "
                     f"(posterior mass {ans.support:.2f})")
    elif ans.supporting:
        lines.append(f"   weakly supported: the answer is in passage {', '.join(str(k + 1) for k in ans.supporting)} "
                     f"but those hold only {ans.support:.2f} of the posterior; treat it as a guess")
    else:
        lines.append("   not supported: the answer occurs in none of the retrieved passages; it is the generator's "
                     "guess, not something the index says")
    lines += ["", "passages:"]
    for i, p in enumerate(ans.passages, 1):
        text = p.text if len(p.text) < 160 else p.text[:157] + "..."
        mark = "*" if i - 1 in ans.supporting else " "
        found = ""
        if any(q.bm25_rank for q in ans.passages):  # BM25 or hybrid retrieval: which side found the passage
            found = " (" + ", ".join(f"{side} #{r}" for side, r in (("dense", p.dense_rank), ("BM25", p.bm25_rank))
                                     if r) + ")"
        lines.append(f" {mark}{i}. score {p.score:6.3f}  p(z|x) {p.prior:.3f}  p(z|x,y) {p.posterior:.3f}  "
                     f"[{p.title}]{found} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # its own parser: rag serve --help
        from rag.serve import main as serve

        return serve(argv[1:])
    args = _parser().parse_args(argv)
    from rag.errors import quiet_logging, run_cli

    quiet_logging(logging.WARNING if args.json else logging.INFO)

    return run_cli(lambda: _ask(args))


def _ask(args) -> int:
    from rag.first_use import load_pipeline

    overrides = list(args.set)
    if args.beams is not None:
        overrides.append(f"decoding.num_beams={args.beams}")
    pipe = load_pipeline(args.pretrained or args.config, tuple(overrides))
    ans = pipe.answer(args.question, mode=args.mode, n_docs=args.n_docs)
    print(json.dumps(ans.to_json(), indent=2) if args.json else _show(ans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
