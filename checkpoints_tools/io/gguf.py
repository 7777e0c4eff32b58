"""The GGUF container (llama.cpp's checkpoint format, https://github.com/ggml-org/ggml docs/gguf.md):
its header read and validated before a byte of tensor data is touched (``read_gguf_header``).

A GGUF file is a little-endian header -- magic ``GGUF``, version (2 or 3), tensor and metadata
counts, the metadata key/value pairs (typed scalars, strings, arrays), one record per tensor (name,
dims innermost first, ggml type, offset) -- then the tensor data, each tensor at an aligned offset
from the start of the data section (``general.alignment``, default 32). Nothing in a file is
trusted: every length, count and offset is checked against the bytes that are there before it is
used, so a truncated or lying file stops with one line naming the file and the field or tensor
(never a huge allocation or an endless loop). ``readers/gguf.py`` reads the tensors through the
validated table; ``checkpoints_tools/gguf_tokenizer.py`` reads the tokenizer from the metadata.
The type ids, block sizes and names are the ``gguf`` package's (llama.cpp's own Python library).
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checkpoints_tools.safe_load import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
"""Versions read: 3 (current) and 2 (64-bit counts too; version 1 had 32-bit ones)."""
MAX_DIMS = 4
"""ggml's GGML_MAX_DIMS: a tensor has 1 to 4 dims."""
DEFAULT_ALIGNMENT = 32

_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
"""GGUF value type -> (struct format, bytes): uint8, int8, uint16, int16, uint32, int32, float32,
bool (one byte), uint64, int64, float64. 8 is a string (uint64 length + UTF-8 bytes), 9 an array
(uint32 item type, uint64 count, items)."""
_STRING, _ARRAY, _BOOL = 8, 9, 7
_MIN_ITEM = {**{t: n for t, (_, n) in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
"""The fewest bytes one value of each type takes: bounds a count before any loop over it."""
_MAX_NESTING = 3
_MAX_ITEMS = 1 << 24
"""The longest metadata array read (a tokenizer table has 10^4 to 10^6 entries)."""
_MIN_KV = 8 + 4 + 1
_MIN_TENSOR_RECORD = 8 + 4 + 8 + 4 + 8
"""The fewest bytes a metadata pair (key length, type, a one-byte value) and a tensor record (name
length, dim count, one dim, type, offset) take: they bound the counts in the header."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor record: name, torch-order shape (GGUF lists dims innermost first), ggml type,
    absolute byte offset and size of its data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one innermost row (the blocks of a quantized type never cross rows)."""
        rows = 1
        for s in self.shape[:-1]:
            rows *= s
        return self.nbytes // rows


@dataclass(frozen=True)
class GGUFHeader:
    """A validated GGUF header: its version, metadata (plain Python values: int, float, bool, str
    and lists of them) and tensor records in file order."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: "OrderedDict[str, GGUFTensor]"
    data_start: int
    alignment: int


class _Truncated(Exception):
    pass


class _Cursor:
    """Little-endian reads from ``buf`` at ``pos``, each checked against the end first."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        at = self.pos
        self.pos += n
        return at

    def scalar(self, vtype: int) -> Any:
        fmt, n = _SCALARS[vtype]
        v = struct.unpack_from(fmt, self.buf, self.take(n))[0]
        return bool(v) if vtype == _BOOL else v

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def string(self) -> str:
        n = self.u64()
        at = self.take(n)
        return bytes(self.buf[at:at + n]).decode("utf-8")

    def count(self, n: int, min_bytes: int) -> int:
        """``n`` items of at least ``min_bytes`` each, once the bytes left can hold them."""
        if n * min_bytes > self.size - self.pos:
            raise _Truncated
        return n

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        item = self.u32()
        if item not in _MIN_ITEM:
            raise ValueError(f"array of unknown value type {item}")
        if item == _ARRAY and depth >= _MAX_NESTING:
            raise ValueError(f"arrays nested deeper than {_MAX_NESTING}")
        n = self.count(self.u64(), _MIN_ITEM[item])
        if n > _MAX_ITEMS:
            raise ValueError(f"array of {n} items (at most {_MAX_ITEMS})")
        if item in _SCALARS and item != _BOOL:  # one unpack for the whole array
            fmt, width = _SCALARS[item]
            return list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.take(n * width)))
        return [self.value(item, depth + 1) for _ in range(n)]


def _quant_sizes() -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """ggml type id -> (elements per block, bytes per block), and -> its name (``gguf`` package)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return ({int(t): v for t, v in GGML_QUANT_SIZES.items()},
            {int(t): t.name for t in GGMLQuantizationType})


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """The validated header of the GGUF file at ``path``; errors name the file and the field or
    tensor (a truncated file, an unknown type, a count or offset beyond the file, absurd dims,
    overlapping tensors, a big-endian file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise CheckpointError(f"{path}: {size} bytes, too short to be a GGUF file")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _parse(path, buf, size)


def _parse(path: Path, buf: mmap.mmap, size: int) -> GGUFHeader:
    if buf[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected {MAGIC!r})")
    c = _Cursor(buf, size)
    c.take(4)
    version = c.u32()
    if version not in VERSIONS:
        hint = " (a big-endian file? only little-endian GGUF is read)" if version & 0xFFFF == 0 else ""
        raise CheckpointError(f"{path}: GGUF version {version} is not supported "
                              f"({', '.join(map(str, VERSIONS))}){hint}")
    n_tensors, n_kv = c.u64(), c.u64()
    where = "the metadata count"
    metadata: dict[str, Any] = {}
    try:
        c.count(n_kv, _MIN_KV)
        for i in range(n_kv):
            where = f"metadata entry {i}"
            key = c.string()
            where = f"metadata key {key!r}"
            if key in metadata:
                raise ValueError("appears twice")
            metadata[key] = c.value(c.u32())
        where = "the tensor count"
        c.count(n_tensors, _MIN_TENSOR_RECORD)
        records = []
        for i in range(n_tensors):
            where = f"tensor record {i}"
            name = c.string()
            where = f"tensor {name!r}"
            n_dims = c.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise ValueError(f"has {n_dims} dims (1 to {MAX_DIMS})")
            dims = [c.u64() for _ in range(n_dims)]
            records.append((name, dims, c.u32(), c.u64()))
    except _Truncated:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF header: {where} runs past the end of the file "
                              f"({size} bytes)") from None
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: corrupt GGUF header: {where}: {e}") from None
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-c.pos // alignment) * alignment
    return GGUFHeader(path=path, version=version, metadata=metadata,
                      tensors=_tensor_table(path, records, data_start=data_start, alignment=alignment, size=size),
                      data_start=data_start, alignment=alignment)


def _tensor_table(path: Path, records: list, *, data_start: int, alignment: int,
                  size: int) -> "OrderedDict[str, GGUFTensor]":
    sizes, names = _quant_sizes()
    out: OrderedDict[str, GGUFTensor] = OrderedDict()
    for name, dims, gtype, rel in records:
        if name in out:
            raise CheckpointError(f"{path}: tensor {name!r} appears twice")
        if gtype not in sizes:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type {gtype}")
        block, block_bytes = sizes[gtype]
        if any(d < 1 for d in dims) or dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name!r} has dims {dims} ({names[gtype]} rows are whole blocks of "
                                  f"{block})")
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * block_bytes
        if rel % alignment:
            raise CheckpointError(f"{path}: tensor {name!r} starts at offset {rel}, not a multiple of the "
                                  f"alignment {alignment}")
        start = data_start + rel
        if start + nbytes > size:
            raise CheckpointError(f"{path}: tensor {name!r} ({names[gtype]} {list(reversed(dims))}) needs bytes "
                                  f"[{start}, {start + nbytes}) but the file has {size} (truncated?)")
        out[name] = GGUFTensor(name, tuple(reversed(dims)), gtype, names[gtype], start, nbytes)
    end = 0
    for t in sorted(out.values(), key=lambda t: t.offset):
        if t.offset < end:
            raise CheckpointError(f"{path}: tensor {t.name!r} overlaps the tensor before it in the file")
        end = t.offset + t.nbytes
    return out
