"""Packing a token stream of documents into training blocks (paper §3.1: 4096-token context).

Documents (each ending with ``<eos>``) are laid end to end in one stream; a block is a contiguous
slice ``[offsets[b], offsets[b+1])`` of that stream, so packing is only a list of boundaries and
blocks are read straight from a memory map. Policies at document boundaries (``break_mode``,
named after fairseq's ``TokenBlockDataset``):

- ``complete`` (default): a block holds whole documents, greedily, as many as fit in
  ``block_size``; a document longer than ``block_size`` is cut into ``block_size`` pieces and its
  last piece is packed with the documents after it. Blocks vary in length (<= block_size); the
  collater pads. Images stay whole unless their document alone exceeds a block.
- ``none``: the stream is cut every ``block_size`` tokens regardless of documents (fullest blocks;
  documents and images may be split).
- ``eos``: one document per block; longer documents are cut into ``block_size`` pieces.

Nothing is ever dropped: the concatenation of all blocks is the stream (tested as a round trip).

Public API::

    pack_offsets(doc_lengths, *, block_size, break_mode="complete") -> np.ndarray int64 (B + 1,)
    gather_blocks(stream, offsets, *, pad) -> np.ndarray (B, max_len) padded copy, for benchmarks
"""

from __future__ import annotations

import numpy as np

BREAK_MODES = ("complete", "none", "eos")


def _split_long(starts: np.ndarray, ends: np.ndarray, block_size: int) -> np.ndarray:
    """Boundaries of [start, end) pieces cut every block_size tokens from each start."""
    lengths = ends - starts
    pieces = np.maximum(1, -(-lengths // block_size))  # ceil, >= 1
    rep_starts = np.repeat(starts, pieces)
    within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return rep_starts + within * block_size


def pack_offsets(doc_lengths: np.ndarray, *, block_size: int, break_mode: str = "complete") -> np.ndarray:
    """Block boundaries (B + 1,) int64 over the stream of documents with these lengths."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if break_mode not in BREAK_MODES:
        raise ValueError(f"unknown break_mode {break_mode!r}; expected one of {BREAK_MODES}")
    lengths = np.asarray(doc_lengths, dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError("every document must hold at least one token")
    ends = np.cumsum(lengths)  # (D,) document end offsets
    total = int(ends[-1]) if ends.size else 0
    if total == 0:
        return np.zeros(1, dtype=np.int64)
    if break_mode == "none":
        return np.append(np.arange(0, total, block_size, dtype=np.int64), total)
    if break_mode == "eos":
        starts = ends - lengths
        return np.append(_split_long(starts, ends, block_size), total).astype(np.int64)
    # complete: one step per block (not per token, not per document)
    out = [0]
    s = 0
    while s < total:
        j = int(np.searchsorted(ends, s + block_size, side="right")) - 1  # last doc end within reach
        if j >= 0 and ends[j] > s:
            s = int(ends[j])
        else:  # the document at s is longer than what is left of the block: cut it
            s = s + block_size
        out.append(s)
    return np.asarray(out, dtype=np.int64)


def gather_blocks(stream: np.ndarray, offsets: np.ndarray, *, pad: int) -> np.ndarray:
    """Copy blocks into a right-padded (B, max_len) int64 array with one vectorised gather."""
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)  # (B,)
    width = int(sizes.max()) if sizes.size else 0
    col = np.arange(width, dtype=np.int64)  # (W,)
    idx = offsets[:-1, None] + col[None, :]  # (B, W)
    valid = col[None, :] < sizes[:, None]
    out = np.full(idx.shape, pad, dtype=np.int64)
    out[valid] = stream[idx[valid]]
    return out
