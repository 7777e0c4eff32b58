"""Throughput of the data path on one core: CM3 transform (paper §3.1 "Objective") and packing
into 4096-token blocks, next to a plain copy of the same arrays measured in the same run.

    python benchmarks/bench_data.py [--tokens 8000000] [--block-size 4096] [--repeats 3]

Prints a table of tokens/s and the ratio to the plain-copy baseline (target: CM3 + packing
>= 5M tokens/s). Data: image-caption and interleaved documents (1024-token images framed by
<break>, text runs, <eos>) with the paper's vocabulary (56,320 text ids, 8192 image codes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from jam_metaseq.data.binarize import binarize, open_dataset  # noqa: E402
from jam_metaseq.data.packing import gather_blocks, pack_offsets  # noqa: E402
from jam_metaseq.data.tokenizers import ByteTokenizer  # noqa: E402
from jam_metaseq.objectives.cm3 import cm3_transform  # noqa: E402
from jam_metaseq.vocab import VocabManifest  # noqa: E402


def make_stream(vocab: VocabManifest, n_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(stream int64 (N,), document lengths) of image-caption / interleaved / text documents."""
    docs = []
    total = 0
    while total < n_tokens:
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            parts.append(rng.integers(vocab.text_start, vocab.text_end, size=int(rng.integers(10, 300))))
            if rng.random() < 0.7:
                img = rng.integers(vocab.image_start, vocab.image_end, size=vocab.image_tokens_per_image)
                parts.append(np.concatenate([[vocab.break_id], img, [vocab.break_id]]))
        parts.append(np.array([vocab.eos]))
        doc = np.concatenate(parts).astype(np.int64)
        docs.append(doc)
        total += doc.size
    lengths = np.array([d.size for d in docs], dtype=np.int64)
    return np.concatenate(docs), lengths


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8_000_000, help="tokens in the synthetic stream")
    ap.add_argument("--block-size", type=int, default=4096, help="packing block size")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    ap.add_argument("--binarize-docs", type=int, default=2000,
                    help="documents for the JSONL -> memmap row (0 skips it)")
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    vocab = VocabManifest(text_size=56320)
    rng = np.random.default_rng(0)
    stream, lengths = make_stream(vocab, args.tokens, rng)
    n = stream.size
    bs = args.block_size
    offsets = pack_offsets(lengths, block_size=bs, break_mode="complete")
    blocks = [stream[offsets[i]:offsets[i + 1]] for i in range(offsets.size - 1)]
    masks = [np.ones(b.size, dtype=bool) for b in blocks]

    def copy_blocks():
        for b in blocks:
            b.copy()

    def pack_only():
        off = pack_offsets(lengths, block_size=bs, break_mode="complete")
        gather_blocks(stream, off, pad=vocab.pad)

    def cm3_only():
        r = np.random.default_rng(1)
        for b in blocks:
            cm3_transform(b, r, vocab=vocab)

    def cm3_weights():
        r = np.random.default_rng(1)
        for b, m in zip(blocks, masks):
            cm3_transform(b, r, vocab=vocab, return_loss_weights=True, loss_mask=m, max_len=bs)

    def pack_and_cm3():
        off = pack_offsets(lengths, block_size=bs, break_mode="complete")
        r = np.random.default_rng(1)
        for i in range(off.size - 1):
            cm3_transform(stream[off[i]:off[i + 1]], r, vocab=vocab, max_len=bs)

    rows = [("plain copy of the blocks (baseline)", copy_blocks),
            ("pack_offsets + padded gather", pack_only),
            ("cm3_transform per block", cm3_only),
            ("cm3_transform + loss weights + max_len", cm3_weights),
            ("pack + cm3_transform (the training path)", pack_and_cm3)]
    results = [(name, n / timed(fn, args.repeats)) for name, fn in rows]

    if args.binarize_docs:
        with tempfile.TemporaryDirectory() as d:
            small = vocab
            path = os.path.join(d, "docs.jsonl")
            n_bin = 0
            with open(path, "w") as f:
                ends = np.cumsum(lengths[: args.binarize_docs])
                for j, e in enumerate(ends):
                    doc = stream[e - lengths[j]:e - 1]  # without <eos>
                    segs, brk = [], np.flatnonzero(doc == vocab.break_id)
                    prev = 0
                    for s, t in zip(brk[0::2], brk[1::2]):
                        if s > prev:
                            segs.append({"text": "x" * int(s - prev)})
                        segs.append({"image_tokens": (doc[s + 1:t] - vocab.image_start).tolist()})
                        prev = t + 1
                    if prev < doc.size:
                        segs.append({"text": "x" * int(doc.size - prev)})
                    f.write(json.dumps(segs) + "\n")
                    n_bin += int(lengths[j])
            t0 = time.perf_counter()
            binarize(path, out_prefix=os.path.join(d, "ds"), vocab=small, text_tokenizer=ByteTokenizer(),
                     block_size=bs, progress=False)
            t_bin = time.perf_counter() - t0
            ds = open_dataset(os.path.join(d, "ds"))
            n_read = int(ds.sizes.sum())

            def read_cm3():
                r = np.random.default_rng(1)
                for i in range(len(ds)):
                    item = ds[i]
                    cm3_transform(item["tokens"], r, vocab=small, return_loss_weights=True,
                                  loss_mask=item["loss_mask"], max_len=bs)

            t_read = timed(read_cm3, args.repeats)
            base_small = timed(lambda: [ds[i]["tokens"].copy() for i in range(len(ds))], args.repeats)
        results.append(("binarize JSONL -> memmap (one-off)", n_bin / t_bin))
        results.append(("memmap read + copy (baseline 2)", n_read / base_small))
        results.append(("memmap read + cm3 + weights", n_read / t_read))

    base = results[0][1]
    print(f"stream: {n:,} tokens, {lengths.size:,} documents, {len(blocks):,} blocks of <= {bs}; one core")
    print(f"{'step':<44} {'Mtok/s':>10} {'vs copy':>9}")
    for name, tps in results:
        print(f"{name:<44} {tps / 1e6:>10.1f} {tps / base:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
