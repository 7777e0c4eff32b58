"""The safetensors format: its dtype names, a header validated as the reference library validates
it (``read_safetensors_header``), index files (``read_safetensors_index``), and a streamed writer
whose header is fixed up front from the planned shapes (``SafetensorsStreamWriter``).
``readers/safetensors.py`` reads tensors through these headers.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from checkpoints_tools.io.errors import OutputError
from checkpoints_tools.io.hashed_file import HashedFile
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.errors import JamError
from jam_metaseq.inputs import InputError, loads_json, safe_component

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_OTHER_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "E8M0", "C64")
"""Dtypes the safetensors format knows but torch cannot hold as one tensor per element here."""
ST_MAX_HEADER = 100_000_000
"""The safetensors library's limit on the JSON header (bytes)."""


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data buffer."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: the tensors in file order, ``__metadata__`` and where the
    data buffer starts."""

    tensors: "OrderedDict[str, SafetensorsEntry]"
    metadata: dict[str, str]
    data_start: int


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file as the reference ``safetensors``
    library does (whatever it refuses, this refuses; a few things it accepts are refused too:
    duplicate JSON keys and dtypes torch has no type for). Checked: the 8-byte header length is
    within the file and under ``ST_MAX_HEADER``; the header is UTF-8 JSON, an object; each
    entry has a known ``dtype``, a ``shape`` of non-negative integers and two integer
    ``data_offsets`` [begin, end] with end - begin = elements x item size; sorted by offset,
    the tensors tile the data buffer exactly (no overlap, no gap, nothing after the last);
    ``__metadata__`` maps strings to strings. Every error names the file (and the tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes: no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > ST_MAX_HEADER:
            raise CheckpointError(f"{path}: safetensors header length {n} is over the {ST_MAX_HEADER}-byte "
                                  "limit (corrupt, or not a safetensors file)")
        if 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} runs past the end of the file "
                                  f"({size} bytes): truncated, or not a safetensors file")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: safetensors header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_json_object_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    data_start = 8 + n
    data_size = size - data_start
    md = header.pop("__metadata__", None)
    if md is None:
        md = {}
    if not isinstance(md, dict):
        raise CheckpointError(f"{path}: safetensors __metadata__ is a JSON {type(md).__name__}, not an object")
    for k, v in md.items():
        if not isinstance(v, str):
            raise CheckpointError(f"{path}: safetensors __metadata__ {k!r} is a {type(v).__name__}, not a string")
    tensors: OrderedDict[str, SafetensorsEntry] = OrderedDict()
    for k, v in header.items():
        where = f"{path}: tensor {k!r}"
        if not isinstance(v, dict):
            raise CheckpointError(f"{where}: header entry is a JSON {type(v).__name__}, not an object")
        for fld in ("dtype", "shape", "data_offsets"):
            if fld not in v:
                raise CheckpointError(f"{where}: header entry has no {fld!r}")
        dt_name, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
        if not isinstance(dt_name, str) or dt_name not in _ST_DTYPES:
            if isinstance(dt_name, str) and dt_name in _ST_OTHER_DTYPES:
                raise CheckpointError(f"{where}: dtype {dt_name} is not supported here")
            raise CheckpointError(f"{where}: unknown dtype {dt_name!r}")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end] with integers >= 0")
        dtype = _ST_DTYPES[dt_name]
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        begin, end = offsets
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        if end > data_size:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] run past the {data_size} bytes of "
                                  "data in the file (truncated?)")
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, but shape "
                                  f"{list(shape)} of {dt_name} needs {nbytes}")
        tensors[k] = SafetensorsEntry(tuple(shape), dtype, begin, end)
    pos, prev = 0, None
    for k, e in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < pos:
            raise CheckpointError(f"{path}: tensor {k!r}: data_offsets [{e.begin}, {e.end}] overlap tensor {prev!r} "
                                  f"(which ends at {pos})")
        if e.begin > pos:
            raise CheckpointError(f"{path}: tensor {k!r}: data_offsets begin at {e.begin}, leaving bytes "
                                  f"[{pos}, {e.begin}) of the data unused (a gap)")
        pos, prev = e.end, k
    if pos != data_size:
        raise CheckpointError(f"{path}: the tensors cover {pos} of the {data_size} bytes of data: "
                              f"{data_size - pos} trailing bytes belong to no tensor")
    return SafetensorsHeader(tensors, md, data_start)


def read_safetensors_index(path: Path) -> dict[str, Path]:
    """The ``weight_map`` of a ``*.safetensors.index.json`` (or HF's ``pytorch_model.bin.index.json``, the
    same format): tensor -> file next to the index, validated."""
    try:
        idx = loads_json(path.read_bytes(), where=str(path))
    except InputError as e:
        raise CheckpointError(f"{path}: cannot read the index ({e.detail})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the index ({e})") from None
    wm = idx.get("weight_map") if isinstance(idx, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{path}: index has no \"weight_map\" object of tensor -> file name")
    out = {}
    for k, v in wm.items():
        try:  # issue 27 §1: a file name from a manifest is one plain component, next to the index
            safe_component(v, what=f"weight_map's file for {k!r}")
        except JamError as e:
            raise CheckpointError(f"{path}: {e}: not a file next to the index") from None
        out[k] = path.parent / v
    return out




# ---- safetensors, streamed ---------------------------------------------------------------------


class SafetensorsStreamWriter:
    """A safetensors file whose header is fixed up front from the planned shapes/dtypes."""

    def __init__(self, path: Path, plan: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None, *, shown: Path | None = None) -> None:
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        off = 0
        self._order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []
        for name, shape, dt in plan:
            n = dt.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": ST_DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
            self._order.append((name, tuple(shape), dt, n))
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)  # keep tensor data 8-byte aligned
        self.path = path
        self._file = HashedFile(path, shown=shown)
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._file.check()
        self._i = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        want, shape, dt, n = self._order[self._i]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dt:
            raise OutputError(f"{self.path}: expected {want} {shape} {dt}, got {name} "
                              f"{tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().contiguous()
        if n:
            self._file.write(t.view(-1).view(torch.uint8).numpy().data if t.dtype != torch.bool
                             else t.to(torch.uint8).numpy().data)
            self._file.check()
        self._i += 1

    def finish(self) -> tuple[str, int]:
        if self._i != len(self._order):
            raise OutputError(f"{self.path}: only {self._i} of {len(self._order)} tensors written")
        return self._file.close()

    def abort(self) -> None:
        self._file.discard()
