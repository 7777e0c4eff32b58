"""``jam-data``: make a vocabulary manifest, validate JSONL documents, binarize them, and
summarise binarized datasets (paper §3.1 Tokenizers/Datasets; layout in ``binarize.py``).

    jam-data vocab     --tokenizer SPEC [--image-codes 8192] --out vocab.json
    jam-data validate  DATA.jsonl... --vocab vocab.json --tokenizer SPEC [--on-error skip]
    jam-data binarize  DATA.jsonl... --vocab vocab.json --tokenizer SPEC --out PREFIX
    jam-data stats     PREFIX...

Progress bars go to stderr, the summary (documents, tokens per modality, images, skipped lines
with reasons) to stdout, as text or ``--json``. Bad input: exit status 2 with a one-line message
naming the file and line (``validate`` exits 1 when it found invalid lines).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jam_metaseq.data.documents import DataReport, iter_jsonl
from jam_metaseq.data.instruct import FORMATS, make_transform
from jam_metaseq.data.packing import BREAK_MODES
from jam_metaseq.errors import add_trust_pickle_flag, run_cli
from jam_metaseq.inputs import NON_NEGATIVE_INT, POSITIVE_INT
from jam_metaseq.vocab import VocabManifest


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", type=Path, help="JSONL files, one document per line")
    p.add_argument("--vocab", required=True, type=Path,
                   help="vocabulary manifest JSON (make one with 'jam-data vocab')")
    p.add_argument("--tokenizer", required=True,
                   help="text tokenizer: a sentencepiece .model, an HF tokenizers .json, spm:PATH, "
                        "bpe:PATH, or 'bytes'")
    p.add_argument("--image-tokenizer", default=None,
                   help="image tokenizer checkpoint for {'image': path} segments "
                        "(jam_metaseq.image_tokenizer.load_image_tokenizer); omit when data holds image_tokens")
    add_trust_pickle_flag(p)
    p.add_argument("--format", choices=FORMATS, default="plain",
                   help="input records: plain documents (conversations {\"turns\": [...]} included), LIMA "
                        "records, wikiHow articles (converted to prompt/response, or LIMA to a conversation of "
                        "all its turns when the vocabulary has conversation tokens), or conversations; all but "
                        "plain are fitted to --max-tokens (conversations: oldest whole exchanges dropped, "
                        "docs/CONVERSATIONS.md)")
    p.add_argument("--max-tokens", type=POSITIVE_INT, default=None,
                   help="longest document in tokens; longer ones are errors (lima/wikihow: fitted to it; "
                        "default 4096 there, unlimited for plain)")
    p.add_argument("--max-images", type=NON_NEGATIVE_INT, default=3, help="wikiHow: keep at most this many images")
    p.add_argument("--loss-on-prompt", action="store_true",
                   help="instruction data: also train on the prompt (default: loss on the response only; "
                        "conversations: on the assistant's turns only)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_layout_flags(p: argparse.ArgumentParser) -> None:
    """The vocabulary layout after the text ids (``VocabManifest``'s fields), for every command that
    writes a manifest (``jam-data vocab``, ``jam-ckpt tokenizer``); ``layout_of`` reads them back."""
    p.add_argument("--image-codes", type=int, default=8192, help="number of image codes (VQ codebook size)")
    p.add_argument("--image-grid", type=int, nargs=2, default=(32, 32), metavar=("H", "W"),
                   help="VQ grid of one image; tokens per image = H * W")
    p.add_argument("--sentinels", type=int, default=16, help="number of CM3 sentinels <mask:i>")
    p.add_argument("--pad-to-multiple", type=int, default=8, help="round the vocabulary size up to this")
    p.add_argument("--conversation-tokens", action="store_true",
                   help="add <user>, <assistant> and <eot> after <eoss> for multi-turn conversations "
                        "(docs/CONVERSATIONS.md)")


def layout_of(args: argparse.Namespace) -> dict[str, Any]:
    """``VocabManifest`` keyword arguments from ``add_layout_flags``' flags."""
    h, w = args.image_grid
    return dict(image_codes=args.image_codes, num_sentinels=args.sentinels, pad_to_multiple=args.pad_to_multiple,
                image_tokens_per_image=h * w, image_grid=(h, w), conversation_tokens=args.conversation_tokens)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jam-data", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("vocab", help="write a vocabulary manifest sized for a text tokenizer")
    p.add_argument("--tokenizer", required=True, help="text tokenizer spec (see 'validate --help')")
    add_layout_flags(p)
    p.add_argument("--out", required=True, type=Path, help="output manifest path (written atomically)")

    p = sub.add_parser("validate", help="check JSONL documents and summarise them")
    _add_input_args(p)
    p.add_argument("--on-error", choices=("fail", "skip"), default="skip",
                   help="fail: stop at the first bad line; skip: report every bad line (default)")

    p = sub.add_parser("binarize", help="tokenise JSONL documents into a memory-mapped dataset")
    _add_input_args(p)
    p.add_argument("--out", required=True, help="output prefix P (writes P.json, P.tokens.bin, ...)")
    p.add_argument("--block-size", type=POSITIVE_INT, default=4096, help="tokens per training block")
    p.add_argument("--break-mode", choices=BREAK_MODES, default="complete",
                   help="packing at document boundaries: complete (whole documents per block), none "
                        "(cut every block-size tokens), eos (one document per block)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="fail: stop at the first bad line (default); skip: skip and count bad lines")

    p = sub.add_parser("stats", help="summarise binarized datasets by scanning their tokens")
    p.add_argument("prefixes", nargs="+", help="dataset prefixes written by 'jam-data binarize'")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return ap


def _load_inputs(args: argparse.Namespace) -> tuple[VocabManifest, Any, Any, Any]:
    from jam_metaseq.data.tokenizers import load_text_tokenizer

    vocab = VocabManifest.load(args.vocab)
    text_tok = load_text_tokenizer(args.tokenizer)
    if text_tok.vocab_size > vocab.text_size:
        raise ValueError(f"tokenizer {args.tokenizer} has {text_tok.vocab_size} ids but {args.vocab} "
                         f"holds text_size {vocab.text_size}")
    image_tok = None
    if args.image_tokenizer:
        from jam_metaseq.image_tokenizer import load_image_tokenizer

        image_tok = load_image_tokenizer(args.image_tokenizer, trust_pickle=args.trust_pickle)
    max_tokens = args.max_tokens
    if max_tokens is None and args.format != "plain":
        max_tokens = 4096
    transform = make_transform(args.format, vocab=vocab, text_tokenizer=text_tok, max_tokens=max_tokens,
                               max_images=args.max_images)
    args.max_tokens = max_tokens
    return vocab, text_tok, image_tok, transform


def _print_summary(title: str, summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"== {title}")
    for k in ("documents", "lines", "tokens", "text_tokens", "image_tokens", "special_tokens", "images",
              "blocks", "block_size", "break_mode", "mean_block", "skipped_total"):
        if k in summary:
            print(f"{k:>16}: {summary[k]}")
    for reason, n in sorted(summary.get("skipped", {}).items()):
        print(f"{'skipped ' + reason:>32}: {n}")
    for msg in summary.get("first_errors", [])[:5]:
        print(f"  {msg}")


def cmd_vocab(args: argparse.Namespace) -> int:
    from jam_metaseq.data.tokenizers import load_text_tokenizer

    tok = load_text_tokenizer(args.tokenizer)
    vocab = VocabManifest(text_size=tok.vocab_size, text_tokenizer=tok.spec, **layout_of(args))
    vocab.save(args.out)
    print(json.dumps(vocab.to_dict()["ids"]))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    vocab, text_tok, image_tok, transform = _load_inputs(args)
    report = DataReport()
    for path in args.inputs:
        if not path.is_file():
            raise FileNotFoundError(f"input not found: {path}")
        it = iter_jsonl(path, on_error=args.on_error, vocab=vocab, text_tokenizer=text_tok,
                        image_tokenizer=image_tok, max_tokens=args.max_tokens,
                        response_loss_only=not args.loss_on_prompt, report=report, transform=transform)
        for _ in tqdm(it, desc=f"validate {path.name}", unit="doc", file=sys.stderr, dynamic_ncols=True):
            pass
    summary = report.to_dict()
    _print_summary("validate", summary, as_json=args.json)
    if summary["skipped_total"]:
        print(f"jam-data: {summary['skipped_total']} invalid line(s); first: {report.first_errors[0]}",
              file=sys.stderr)
        return 1
    return 0


def cmd_binarize(args: argparse.Namespace) -> int:
    from jam_metaseq.data.binarize import binarize

    vocab, text_tok, image_tok, transform = _load_inputs(args)
    index = binarize(args.inputs, out_prefix=args.out, vocab=vocab, text_tokenizer=text_tok,
                     image_tokenizer=image_tok, block_size=args.block_size, break_mode=args.break_mode,
                     on_error=args.on_error, max_tokens=args.max_tokens,
                     response_loss_only=not args.loss_on_prompt, transform=transform, progress=True)
    summary = dict(index["report"])
    summary.update(blocks=index["num_blocks"], block_size=index["block_size"], break_mode=index["break_mode"])
    _print_summary(f"binarize -> {args.out}", summary, as_json=args.json)
    return 0


def dataset_stats(prefix: str, *, chunk: int = 1 << 22, progress: bool = True) -> dict[str, Any]:
    """Count tokens per modality by scanning a binarized dataset in chunks (never all in memory)."""
    from tqdm import tqdm

    from jam_metaseq.data.binarize import open_dataset

    ds = open_dataset(prefix)
    v = ds.vocab
    tokens, mask = ds._maps()
    counts = dict(text_tokens=0, image_tokens=0, special_tokens=0, breaks=0, eos=0, loss_tokens=0)
    for s in tqdm(range(0, ds.num_tokens, chunk), desc=f"stats {Path(prefix).name}", unit="chunk",
                  file=sys.stderr, disable=not progress, dynamic_ncols=True):
        t = np.asarray(tokens[s:s + chunk], dtype=np.int64)
        n_text, n_img = int(v.is_text(t).sum()), int(v.is_image(t).sum())
        counts["text_tokens"] += n_text
        counts["image_tokens"] += n_img
        counts["special_tokens"] += t.size - n_text - n_img
        counts["breaks"] += int(v.is_frame(t).sum())
        counts["eos"] += int((t == v.eos).sum())
        counts["loss_tokens"] += int(np.count_nonzero(mask[s:s + chunk])) if mask is not None else t.size
    return {
        "prefix": prefix, "documents": ds.num_documents, "tokens": ds.num_tokens, **counts,
        "images": counts["breaks"] // 2, "blocks": len(ds), "block_size": ds.block_size,
        "break_mode": ds.break_mode, "mean_block": round(float(ds.sizes.mean()), 1) if len(ds) else 0.0,
        "skipped": ds.index.get("report", {}).get("skipped", {}),
        "skipped_total": ds.index.get("report", {}).get("skipped_total", 0),
    }


def cmd_stats(args: argparse.Namespace) -> int:
    for prefix in args.prefixes:
        _print_summary(f"stats {prefix}", dataset_stats(prefix), as_json=args.json)
    return 0


COMMANDS = {"vocab": cmd_vocab, "validate": cmd_validate, "binarize": cmd_binarize, "stats": cmd_stats}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(f"jam-data {args.command}", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
