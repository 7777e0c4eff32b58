"""Binarized, memory-mapped token storage, so training streams 50B tokens without loading them
(paper §3.1 "Training - Alignment Phase": ~50B multimodal tokens, 4096-token sequences).

``binarize`` reads JSONL documents (``documents.py``), serialises them and appends them to flat
files as it goes (memory: one document plus its length); packing (``packing.py``) is computed at
the end from the document lengths. Files, for ``out_prefix = P``::

    P.tokens.bin   token ids, uint16 when the vocabulary has <= 65536 ids, else int32
    P.mask.bin     uint8 loss mask, 1 = trained on (only written when some token is 0)
    P.docs.bin     int64 (D + 1,) document offsets into the token stream
    P.blocks.bin   int64 (B + 1,) block offsets (see packing.py for the break_mode policies)
    P.vocab.json   a copy of the vocabulary manifest
    P.json         the index: format, dtype, counts, block_size, break_mode, the data report

Every file is written under a temporary name and renamed at the end, the index last: a dataset
with an index is complete.

Public API::

    binarize(jsonl_paths, *, out_prefix, vocab, text_tokenizer, image_tokenizer=None,
             block_size=4096, break_mode="complete", on_error="fail", max_tokens=None,
             response_loss_only=True, transform=None, progress=True) -> dict (the index)
    open_dataset(prefix, *, vocab=None, block_size=None, break_mode=None) -> TokenBlockDataset
    TokenBlockDataset: len(), [i] -> {"tokens": int64 (L,), "loss_mask": bool (L,)}, .sizes,
                       .vocab, .document(j), .num_tokens
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from jam_metaseq.data.documents import DataReport, iter_jsonl
from jam_metaseq.inputs import read_json
from jam_metaseq.data.packing import BREAK_MODES, pack_offsets
from jam_metaseq.vocab import VocabManifest

FORMAT = "jam-tokens"
FORMAT_VERSION = 1


def token_dtype(vocab: VocabManifest) -> np.dtype:
    return np.dtype(np.uint16) if vocab.size <= 65536 else np.dtype(np.int32)


def _paths(prefix: str | os.PathLike) -> dict[str, Path]:
    p = str(prefix)
    return {k: Path(f"{p}.{k}.bin") for k in ("tokens", "mask", "docs", "blocks")} | {
        "vocab": Path(f"{p}.vocab.json"), "index": Path(f"{p}.json")}


def binarize(
    jsonl_paths: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    out_prefix: str | os.PathLike,
    vocab: VocabManifest,
    text_tokenizer: Any,
    image_tokenizer: Any = None,
    block_size: int = 4096,
    break_mode: str = "complete",
    on_error: str = "fail",
    max_tokens: int | None = None,
    response_loss_only: bool = True,
    transform: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenise JSONL files into one memory-mappable dataset at ``out_prefix``; return its index.

    ``on_error="skip"`` skips bad lines and counts them (``index["report"]["skipped"]``).
    """
    if isinstance(jsonl_paths, (str, os.PathLike)):
        jsonl_paths = [jsonl_paths]
    jsonl_paths = [Path(p) for p in jsonl_paths]
    if break_mode not in BREAK_MODES:
        raise ValueError(f"unknown break_mode {break_mode!r}; expected one of {BREAK_MODES}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    for p in jsonl_paths:
        if not p.is_file():
            raise FileNotFoundError(f"input not found: {p}")
    paths = _paths(out_prefix)
    paths["index"].parent.mkdir(parents=True, exist_ok=True)
    tmp = {k: v.with_name(v.name + f".tmp{os.getpid()}") for k, v in paths.items()}
    dtype = token_dtype(vocab)
    report = DataReport()
    doc_lengths = array("q")
    num_tokens = 0
    any_masked = False
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="doc", desc="binarize", file=sys.stderr, dynamic_ncols=True)
    try:
        with open(tmp["tokens"], "wb") as ftok, open(tmp["mask"], "wb") as fmask:
            for path in jsonl_paths:
                if bar is not None:
                    bar.set_description(f"binarize {path.name}")
                for rec in iter_jsonl(path, on_error=on_error, vocab=vocab, text_tokenizer=text_tokenizer,
                                      image_tokenizer=image_tokenizer, max_tokens=max_tokens,
                                      response_loss_only=response_loss_only, report=report,
                                      transform=transform):
                    assert rec.tokens is not None and rec.loss_mask is not None
                    ftok.write(rec.tokens.astype(dtype).tobytes())
                    fmask.write(rec.loss_mask.astype(np.uint8).tobytes())
                    any_masked = any_masked or not bool(rec.loss_mask.all())
                    doc_lengths.append(int(rec.tokens.size))
                    num_tokens += int(rec.tokens.size)
                    if bar is not None:
                        bar.update(1)
        lengths = np.frombuffer(doc_lengths, dtype=np.int64) if doc_lengths else np.zeros(0, np.int64)
        doc_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        block_offsets = pack_offsets(lengths, block_size=block_size, break_mode=break_mode)
        doc_offsets.tofile(tmp["docs"])
        block_offsets.tofile(tmp["blocks"])
        vocab.save(tmp["vocab"])
        index = {
            "format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype.name,
            "num_tokens": num_tokens, "num_documents": int(lengths.size),
            "num_blocks": int(block_offsets.size - 1), "block_size": block_size,
            "break_mode": break_mode, "has_loss_mask": any_masked,
            "vocab": paths["vocab"].name, "vocab_size": vocab.size,
            "sources": [str(p) for p in jsonl_paths],
            "text_tokenizer": getattr(text_tokenizer, "spec", None),
            "report": report.to_dict(),
        }
        tmp["index"].write_text(json.dumps(index, indent=2) + "\n")
        # publish: data first, index last
        for k in ("tokens", "docs", "blocks", "vocab"):
            os.replace(tmp[k], paths[k])
        if any_masked:
            os.replace(tmp["mask"], paths["mask"])
        else:
            tmp["mask"].unlink()
            paths["mask"].unlink(missing_ok=True)
        os.replace(tmp["index"], paths["index"])
    finally:
        if bar is not None:
            bar.close()
        for t in tmp.values():
            t.unlink(missing_ok=True)
    return index


class TokenBlockDataset:
    """Blocks of a binarized dataset, read through memory maps (picklable: maps reopen lazily)."""

    def __init__(self, prefix: str | os.PathLike, *, vocab: VocabManifest | None = None,
                 block_size: int | None = None, break_mode: str | None = None) -> None:
        self.prefix = str(prefix)
        paths = _paths(prefix)
        if not paths["index"].is_file():
            raise FileNotFoundError(f"no binarized dataset at {self.prefix} (missing {paths['index']})")
        self.index = read_json(paths["index"], what="binarized dataset index")
        if self.index.get("format") != FORMAT or self.index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{paths['index']}: not a {FORMAT} v{FORMAT_VERSION} index")
        missing = [k for k in ("vocab", "dtype", "num_tokens", "has_loss_mask", "block_size", "break_mode")
                   if k not in self.index]
        if missing:
            raise ValueError(f"{paths['index']}: incomplete dataset index (missing {', '.join(missing)})")
        stored = VocabManifest.load(paths["index"].parent / self.index["vocab"])
        # the same manifest, or it with conversation tokens added (every stored id means the same)
        if vocab is not None and not (vocab.extends(stored) and vocab.text_tokenizer == stored.text_tokenizer):
            raise ValueError(
                f"{self.prefix}: data was binarized with a vocabulary of {stored.size} ids "
                f"(text {stored.text_size}, image {stored.image_codes}); the given one has {vocab.size} "
                f"(text {vocab.text_size}, image {vocab.image_codes})")
        self.vocab = stored
        self.dtype = np.dtype(self.index["dtype"])
        self.num_tokens = int(self.index["num_tokens"])
        self.has_loss_mask = bool(self.index["has_loss_mask"])
        self.doc_offsets = np.fromfile(paths["docs"], dtype=np.int64)
        if block_size is None and break_mode is None:
            self.block_offsets = np.fromfile(paths["blocks"], dtype=np.int64)
            self.block_size = int(self.index["block_size"])
            self.break_mode = str(self.index["break_mode"])
        else:  # re-pack at open time: only the boundaries change
            self.block_size = int(block_size or self.index["block_size"])
            self.break_mode = str(break_mode or self.index["break_mode"])
            self.block_offsets = pack_offsets(np.diff(self.doc_offsets), block_size=self.block_size,
                                              break_mode=self.break_mode)
        if not (self.doc_offsets.size and self.block_offsets.size) or \
                self.doc_offsets[-1] != self.num_tokens or self.block_offsets[-1] != self.num_tokens:
            raise ValueError(f"{self.prefix}: offsets do not cover the {self.num_tokens} tokens")
        self.sizes = np.diff(self.block_offsets)  # (B,) block lengths
        self._tokens: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    # memory maps are opened on first use and not pickled (DataLoader workers reopen them)
    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_tokens"] = None
        d["_mask"] = None
        return d

    def _maps(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._tokens is None:
            paths = _paths(self.prefix)
            self._tokens = np.memmap(paths["tokens"], dtype=self.dtype, mode="r", shape=(self.num_tokens,)) \
                if self.num_tokens else np.zeros(0, dtype=self.dtype)
            if self.has_loss_mask:
                self._mask = np.memmap(paths["mask"], dtype=np.uint8, mode="r", shape=(self.num_tokens,))
        return self._tokens, self._mask

    def __len__(self) -> int:
        return int(self.sizes.size)

    def _slice(self, start: int, end: int) -> dict[str, np.ndarray]:
        tokens, mask = self._maps()
        out = {"tokens": np.asarray(tokens[start:end], dtype=np.int64)}
        out["loss_mask"] = (np.asarray(mask[start:end]) != 0) if mask is not None \
            else np.ones(end - start, dtype=bool)
        return out

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range [0, {len(self)})")
        i = i % len(self)
        return self._slice(int(self.block_offsets[i]), int(self.block_offsets[i + 1]))

    @property
    def num_documents(self) -> int:
        return int(self.doc_offsets.size - 1)

    def document(self, j: int) -> dict[str, np.ndarray]:
        """The j-th document as binarized (ends with <eos>)."""
        return self._slice(int(self.doc_offsets[j]), int(self.doc_offsets[j + 1]))


def open_dataset(prefix: str | os.PathLike, *, vocab: VocabManifest | None = None,
                 block_size: int | None = None, break_mode: str | None = None) -> TokenBlockDataset:
    """Open a binarized dataset; ``vocab`` must be the manifest it was binarized with, or that manifest
    with conversation tokens added (``VocabManifest.extends``); block_size/break_mode re-pack."""
    return TokenBlockDataset(prefix, vocab=vocab, block_size=block_size, break_mode=break_mode)
