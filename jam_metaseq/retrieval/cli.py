"""``jam-retrieval``: build, index and query the retrieval memory bank (paper §3.1).

  jam-retrieval build DOCS.jsonl ... --out BANK --vocab V.json --tokenizer T --clip-checkpoint W.pt
  jam-retrieval index BANK --index ivf --nlist 4096 --nprobe 32
  jam-retrieval query BANK --text "a red bicycle" -k 2
  jam-retrieval neighbours BANK -k 2 [--training] [--dataset PREFIX ...]
  jam-retrieval info BANK

Each command parses and validates its flags and calls one library function; progress goes to
stderr, results to stdout or files, and a failure exits 2 with a one-line cause.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jam_metaseq.errors import add_trust_pickle_flag, run_cli
from jam_metaseq.inputs import POSITIVE_INT, RATE, SEED, finite_float
from jam_metaseq.retrieval.index import INDEX_KINDS, IndexConfig


def _add_index_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("faiss index")
    g.add_argument("--index", choices=INDEX_KINDS, default="flat",
                   help="flat = exact IndexFlatIP; ivf = IndexIVFFlat; hnsw = IndexHNSWFlat (default flat)")
    g.add_argument("--nlist", type=POSITIVE_INT, default=None,
                   help="ivf: number of k-means cells (default about 4*sqrt(N))")
    g.add_argument("--nprobe", type=POSITIVE_INT, default=32, help="ivf: cells visited per query (default 32)")
    g.add_argument("--train-size", type=POSITIVE_INT, default=131072,
                   help="ivf: at most this many vectors train the k-means (default 131072)")
    g.add_argument("--hnsw-m", type=POSITIVE_INT, default=32, help="hnsw: links per node (default 32)")
    g.add_argument("--ef-construction", type=POSITIVE_INT, default=80, help="hnsw: build beam width (default 80)")
    g.add_argument("--ef-search", type=POSITIVE_INT, default=128, help="hnsw: search beam width (default 128)")
    g.add_argument("--no-gpu", action="store_true", help="never use faiss-gpu, even when installed")


def _index_config(args: argparse.Namespace) -> IndexConfig:
    return IndexConfig(kind=args.index, nlist=args.nlist, nprobe=args.nprobe, train_size=args.train_size,
                       hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                       ef_search=args.ef_search, use_gpu=False if args.no_gpu else None)


def _check_count(s: str) -> int | None:
    if s.lower() == "all":
        return None
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--check-documents must be >= 1 or 'all', got {s}")
    return n


def _add_select_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection (diversity rules)")
    g.add_argument("-k", type=POSITIVE_INT, default=2, help="documents retrieved per query (default 2)")
    g.add_argument("--score-threshold", type=finite_float(none_ok=True), default=0.9,
                   help="relevance threshold of the diversity rule, or 'none' (default 0.9)")
    g.add_argument("--threshold-rule", choices=("skip_above", "skip_at_or_below"), default="skip_above",
                   help="skip_above: skip candidates scoring above the threshold (CM3leon, default); "
                        "skip_at_or_below: the JAM paper's literal sentence")
    g.add_argument("--duplicate-cosine", type=finite_float(none_ok=True), default=0.9,
                   help="a candidate this similar to an already chosen document is a duplicate "
                        "('none' = only exact token copies are; default 0.9)")
    g.add_argument("--query-dropout", type=RATE, default=0.2,
                   help="fraction of query tokens dropped when retrieving for training (default 0.2)")


def _retriever_config(args: argparse.Namespace):
    from jam_metaseq.retrieval.retriever import RetrieverConfig

    return RetrieverConfig(k=args.k, score_threshold=args.score_threshold,
                           threshold_rule=args.threshold_rule, duplicate_cosine=args.duplicate_cosine,
                           query_dropout=args.query_dropout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jam-retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="encode + tokenize JSONL documents into a memory bank, then index it")
    p.add_argument("documents", nargs="+", type=Path, help="JSONL files, one document per line "
                   "(bank row i = i-th document over the files, in order)")
    p.add_argument("--out", required=True, type=Path, help="bank directory (created; resumed if unfinished)")
    p.add_argument("--vocab", required=True, type=Path, help="vocabulary manifest JSON of the model")
    p.add_argument("--tokenizer", required=True,
                   help="text tokenizer spec for the stored token sequences (see 'jam-data validate --help')")
    p.add_argument("--image-tokenizer", default=None,
                   help="image tokenizer checkpoint, for {'image': path} segments' tokens (and, if it can "
                        "decode, for encoding image_tokens segments with CLIP)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    p.add_argument("--clip-checkpoint", default=None,
                   help="local CLIP weights file (required unless --random-clip-weights)")
    p.add_argument("--random-clip-weights", action="store_true",
                   help="use randomly initialised CLIP weights (smoke tests only: retrieval is meaningless)")
    add_trust_pickle_flag(p)
    p.add_argument("--device", default="cpu", help="torch device of the CLIP encoder (default cpu)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="texts or images per CLIP forward (default 64)")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=4096,
                   help="documents per resumable shard (default 4096)")
    p.add_argument("--query-vectors", action="store_true",
                   help="also store each document encoded with query dropout, for training retrieval "
                        "by bank row")
    p.add_argument("--query-dropout", type=RATE, default=0.2,
                   help="fraction of tokens dropped for --query-vectors (default 0.2)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the query dropout and the ivf k-means")
    p.add_argument("--restart", action="store_true",
                   help="discard an unfinished build in --out instead of resuming it")
    _add_index_args(p)

    p = sub.add_parser("index", help="rebuild a bank's faiss index with another kind or parameters")
    p.add_argument("bank", type=Path, help="bank directory")
    _add_index_args(p)

    p = sub.add_parser("query", help="retrieve documents for a text and/or image query; JSON lines on stdout")
    p.add_argument("bank", type=Path, help="bank directory")
    p.add_argument("--text", default=None, help="query text")
    p.add_argument("--image", type=Path, default=None, help="query image file")
    p.add_argument("--clip-checkpoint", default=None,
                   help="CLIP weights file, when it moved since the bank was built")
    add_trust_pickle_flag(p)
    p.add_argument("--device", default="cpu", help="torch device of the CLIP encoder (default cpu)")
    p.add_argument("--nprobe", type=POSITIVE_INT, default=None, help="override the ivf nprobe")
    p.add_argument("--ef-search", type=POSITIVE_INT, default=None, help="override the hnsw efSearch")
    p.add_argument("--tokens", action="store_true", help="print each document's token ids too")
    _add_select_args(p)

    p = sub.add_parser("neighbours", help="retrieve for every bank document (not itself); writes "
                       "neighbours.npy and neighbour_scores.npy into the bank, and with --dataset the "
                       "per-block PREFIX.neighbours.npy the cm3_multimodal task reads")
    p.add_argument("bank", type=Path, help="bank directory")
    p.add_argument("--training", action="store_true",
                   help="query with the stored query-dropout vectors (bank built with --query-vectors)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1024, help="queries per faiss search (default 1024)")
    p.add_argument("--dataset", action="append", default=[], metavar="PREFIX",
                   help="a 'jam-data binarize' output prefix made from the bank's JSONL files; repeat in "
                        "bank order when the bank spans several. Writes PREFIX.neighbours.npy (one row of "
                        "bank rows per training block, what 'fairseq-train --retrieval-bank' reads) and "
                        "PREFIX.neighbours.info")
    p.add_argument("--check-documents", type=_check_count, default=256, metavar="N",
                   help="documents per --dataset whose tokens are compared with the bank's before "
                        "anything is computed, or 'all' (default 256)")
    _add_select_args(p)

    p = sub.add_parser("info", help="print a bank's manifest and sizes as JSON")
    p.add_argument("bank", type=Path, help="bank directory")
    return parser


def cmd_build(args: argparse.Namespace) -> int:
    from jam_metaseq.data.documents import DocumentError, tokenize_document
    from jam_metaseq.data.tokenizers import load_text_tokenizer
    from jam_metaseq.retrieval.bank import BankBuildConfig, build_memory_bank, count_documents, read_documents
    from jam_metaseq.retrieval.encoders import ClipDocumentEncoder, ClipEncoderConfig
    from jam_metaseq.vocab import VocabManifest

    if args.clip_checkpoint is None and not args.random_clip_weights:
        raise ValueError("--clip-checkpoint is required (or --random-clip-weights for a smoke test)")
    if not 0.0 <= args.query_dropout < 1.0:
        raise ValueError(f"--query-dropout must be in [0, 1), got {args.query_dropout}")
    vocab = VocabManifest.load(args.vocab)
    text_tok = load_text_tokenizer(args.tokenizer)
    image_tok, decoder = None, None
    if args.image_tokenizer:
        from jam_metaseq.image_tokenizer import load_image_tokenizer  # type: ignore[attr-defined]

        image_tok = load_image_tokenizer(args.image_tokenizer, trust_pickle=args.trust_pickle)
        if hasattr(image_tok, "decode_images"):
            grid = vocab.image_grid
            decoder = lambda codes: image_tok.decode_images(codes.reshape(1, *grid))[0]  # noqa: E731
    paths = [str(p) for p in args.documents]
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"documents file not found: {p}")
    if args.restart:
        import shutil

        (args.out / "build_state.json").unlink(missing_ok=True)
        shutil.rmtree(args.out / "shards", ignore_errors=True)
    encoder = ClipDocumentEncoder(config=ClipEncoderConfig(
        model_name=args.clip_model, checkpoint=args.clip_checkpoint, device=args.device,
        batch_size=args.batch_size, trust_pickle=args.trust_pickle))
    config = BankBuildConfig(shard_size=args.shard_size, store_query_vectors=args.query_vectors,
                             query_dropout=args.query_dropout, seed=args.seed,
                             index=_index_config(args))

    def tokenize(d):
        try:  # validates the document against the manifest (image codes in range) before CLIP sees it
            return tokenize_document(d.doc, vocab=vocab, text_tokenizer=text_tok, image_tokenizer=image_tok,
                                     base_dir=d.base_dir)[0]
        except DocumentError as e:
            raise e.at(d.where) from None

    bank = build_memory_bank(documents=read_documents(paths), out_dir=args.out, encoder=encoder,
                             tokenize=tokenize, config=config, sources=paths, vocab=vocab,
                             image_decoder=decoder, total=count_documents(paths))
    print(json.dumps({"bank": str(bank.path), "documents": len(bank), "dim": bank.dim,
                      "index": bank.index_config.kind}))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from jam_metaseq.retrieval.bank import MemoryBank

    bank = MemoryBank.load(args.bank)
    config = _index_config(args)
    print(f"building {config.kind} index over {len(bank)} vectors", file=sys.stderr)
    bank.rebuild_index(config=config)
    print(json.dumps({"bank": str(bank.path), "index": config.to_dict()}))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from jam_metaseq.retrieval.retriever import Retriever

    if args.text is None and args.image is None:
        raise ValueError("give --text and/or --image")
    image = None
    if args.image is not None:
        from jam_metaseq.inputs import load_rgb_image

        if not args.image.is_file():
            raise FileNotFoundError(f"query image not found: {args.image}")
        image = load_rgb_image(args.image)  # pixel count bounded from the header
    overrides: dict[str, Any] = {}
    if args.nprobe is not None:
        overrides["nprobe"] = args.nprobe
    if args.ef_search is not None:
        overrides["ef_search"] = args.ef_search
    retriever = Retriever.from_bank_dir(args.bank, config=_retriever_config(args),
                                        clip_checkpoint=args.clip_checkpoint, device=args.device,
                                        index_overrides=overrides, trust_pickle=args.trust_pickle)
    for d in retriever.retrieve(args.text, image, training=False):
        rec: dict[str, Any] = {"doc_id": d.doc_id, "row": d.row, "score": round(d.score, 6),
                               "length": int(d.tokens.size)}
        if args.tokens:
            rec["tokens"] = d.tokens.tolist()
        print(json.dumps(rec))
    return 0


def cmd_neighbours(args: argparse.Namespace) -> int:
    from jam_metaseq.retrieval.retriever import (Retriever, align_datasets, save_neighbours,
                                                 write_block_neighbours)

    retriever = Retriever.from_bank_dir(args.bank, config=_retriever_config(args), with_encoder=False)
    if args.training and retriever.bank.query_vectors is None:
        raise ValueError(f"{args.bank}: --training needs a bank built with --query-vectors")
    # check the datasets first: a mismatch should fail before the search over the whole bank
    datasets = align_datasets(retriever.bank, args.dataset, check_documents=args.check_documents)
    rows, scores = retriever.precompute_neighbours(training=args.training, batch_size=args.batch_size)
    save_neighbours(retriever.bank, rows=rows, scores=scores, config=retriever.config,
                    training=args.training)
    written = [write_block_neighbours(ds, rows=rows, row_offset=off, bank=retriever.bank,
                                      training=args.training) for ds, off in datasets]
    found = (rows >= 0).sum(axis=1)
    summary: dict[str, Any] = {
        "bank": str(args.bank), "documents": int(rows.shape[0]), "k": int(rows.shape[1]),
        "short": int((found < rows.shape[1]).sum()),
        "mean_score": float(np.nanmean(scores)) if np.isfinite(scores).any() else None}
    if written:
        summary["datasets"] = [{"file": w["file"], "blocks": w["num_blocks"], "documents": w["num_documents"],
                                "row_offset": w["row_offset"], "empty_blocks": w["empty_blocks"]}
                               for w in written]
    print(json.dumps(summary))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from jam_metaseq.retrieval.bank import MemoryBank

    bank = MemoryBank.load(args.bank)
    info = dict(bank.manifest)
    info["tokens"] = int(bank.offsets[-1])
    print(json.dumps(info, indent=2))
    return 0


COMMANDS = {"build": cmd_build, "index": cmd_index, "query": cmd_query, "neighbours": cmd_neighbours,
            "info": cmd_info}


RESUME_NOTE = ("finished shards are kept and nothing half-written was left: run the same command again "
               "to resume")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(f"jam-retrieval {args.command}", lambda: COMMANDS[args.command](args),
                   **({"interrupted": RESUME_NOTE} if args.command == "build" else {}))


if __name__ == "__main__":
    sys.exit(main())
