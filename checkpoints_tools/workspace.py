"""Reusable named buffers for streaming checkpoint work (bounded, page-warm memory).

A tensor-sized ``torch.empty`` per streamed tensor is costly: with a fixed 1 MiB mmap threshold
(``ops.stream.bound_malloc``, which keeps RSS from creeping) each one is a fresh mapping whose pages
fault in one by one, several times slower than copying into memory already touched. Readers,
kernels and writers instead take their per-role buffers from a ``Workspace``: one buffer per
role, as large as the largest tensor of that role still to come, reused for every tensor.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Workspace:
    """Named reusable buffers. ``get(key, shape, dtype)`` views the key's byte buffer (grown when
    too small, never shrunk), so a stream of tensors of one role touches the same pages."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, shape: Sequence[int], dtype: torch.dtype, *, upcoming: int | None = None) -> torch.Tensor:
        """A view of ``key``'s buffer as ``shape``/``dtype``. ``upcoming``: the most bytes this key
        will still be asked for (this request included), if known: the buffer is then sized for
        all of them at once, and given back when it is over twice that (the embedding-sized
        buffer of a stream's first tensors must not stay for the whole model)."""
        n = dtype.itemsize
        for s in shape:
            n *= int(s)
        want = max(n, upcoming or 0)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n or (upcoming is not None and buf.numel() > 2 * max(want, 1 << 20)):
            self._bufs.pop(key, None)  # free the old one first: peak = the new size only
            buf = self._bufs[key] = torch.empty(max(want, 64), dtype=torch.uint8)
        return buf[:n].view(dtype).view(tuple(int(s) for s in shape))

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()
