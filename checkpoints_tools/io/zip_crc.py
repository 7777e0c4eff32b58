"""The CRC-32s of a torch zip file, computed beside the write instead of inside torch.

torch's ``PyTorchFileWriter`` run with ``compute_crc32=False`` writes zeros where each record's
CRC-32 goes; ``ZipCrcs`` is the sink it writes into: it passes the bytes on to a ``HashedFile``
and puts each CRC (the fastest ``crc32`` at hand, on a helper thread for big records) where
``compute_crc32=True`` would have, so the file is byte for byte the same.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from checkpoints_tools.io import hashed_file
from checkpoints_tools.io.errors import OutputError


def _load_crc32() -> Callable[..., int]:
    """The fastest available CRC-32 (zip's polynomial): ISA-L's (``isal``: carry-less multiply,
    ~3x zlib's on this project's CPU box), else zlib-ng's, else Python's zlib."""
    try:
        from isal.isal_zlib import crc32 as fast
        return fast
    except ImportError:
        pass
    try:
        from zlib_ng.zlib_ng import crc32 as fast
        return fast
    except ImportError:
        import zlib
        return zlib.crc32


crc32 = _load_crc32()

_LOCAL, _DESCRIPTOR, _CENTRAL = b"PK\x03\x04", b"PK\x07\x08", b"PK\x01\x02"
_SERIALIZATION_ID = b".data/serialization_id"
_U64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on a 64-bit size_t (how torch combines record CRCs)."""
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & _U64) + (seed >> 2)) & _U64)) & _U64


class ZipCrcs:
    """The sink of torch's zip writer run with ``compute_crc32=False``: it puts the CRC-32s where
    ``compute_crc32=True`` would have, so the file is byte for byte the same, but each CRC is
    computed beside the write and its sha256 (on a helper thread, by the fastest ``crc32`` at
    hand) instead of serially inside torch before the write.

    torch's records are stored with a data descriptor: local header (CRC and sizes 0), name,
    extra field (alignment padding), data, then a 16- or 24-byte descriptor holding the CRC (an
    empty record has none); the central directory at the end repeats each CRC; the record
    ``.data/serialization_id`` ends in 20 digits combining the non-empty records' CRCs
    (``_hash_combine``). ``begin_record(n)``: the caller's next record holds ``n`` bytes; the
    small records torch adds itself are recognised by their descriptor. Any other layout stops
    the write with an ``OutputError`` (kept in the file's ``error``), never a wrong file."""

    def __init__(self, out: "hashed_file.HashedFile") -> None:
        self.out = out
        self.state = "between"  # between | name | data | descriptor | small
        self.need = 0
        self.name = bytearray()
        self.name_len = 0
        self.crc = 0
        self.size = 0
        self.small = bytearray()
        self.expected: int | None = None
        self.records: list[tuple[bytes, int, int]] = []  # (name, crc, size) in file order
        self.tail = bytearray()  # central directory and end records, written by ``finish``

    def begin_record(self, nbytes: int) -> None:
        self.expected = nbytes

    def _bad(self, what: str) -> None:
        raise OutputError(f"{self.out.shown}: unexpected zip layout from torch's writer ({what})")

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        if self.out.discarding:
            return mv.nbytes
        try:
            self._feed(mv)
        except BaseException as e:  # noqa: B036 - never raise into the zip writer (see HashedFile)
            self.out._fail(e)
        return mv.nbytes

    def flush(self) -> None:
        self.out.flush()

    def _end_record(self, crc: int, size: int) -> None:
        self.records.append((bytes(self.name), crc, size))
        self.state, self.expected = "between", None

    def _descriptor(self, mv: memoryview, crc: int, size: int) -> bytes:
        if mv.nbytes not in (16, 24) or bytes(mv[:4]) != _DESCRIPTOR:
            self._bad(f"no data descriptor after {bytes(self.name)!r}")
        d = bytearray(mv)
        stored = int.from_bytes(d[12:16] if mv.nbytes == 16 else d[16:24], "little")
        if stored != size:
            self._bad(f"the descriptor of {bytes(self.name)!r} says {stored} bytes, {size} were written")
        d[4:8] = struct.pack("<I", crc & 0xFFFFFFFF)
        self._end_record(crc, size)
        return bytes(d)

    def _feed(self, mv: memoryview) -> None:
        while mv.nbytes:
            if self.state == "between":
                head = bytes(mv[:4])
                if head == _CENTRAL or self.tail:
                    self.tail += mv
                    return
                if head != _LOCAL or mv.nbytes < 30:
                    self._bad("expected a local file header")
                name_len, extra_len = struct.unpack("<HH", mv[26:30])
                self.out.write(mv[:30])
                self.name, self.name_len, self.need, self.state = bytearray(), name_len, name_len + extra_len, "name"
                mv = mv[30:]
            elif self.state == "name":
                n = min(self.need, mv.nbytes)
                self.name += mv[:max(0, min(n, self.name_len - len(self.name)))]
                self.out.write(mv[:n])
                self.need -= n
                mv = mv[n:]
                if self.need == 0:
                    if self.expected == 0:
                        self._end_record(0, 0)  # empty: no data, no descriptor
                    elif self.expected is not None:
                        self.state, self.need, self.crc, self.size = "data", self.expected, 0, 0
                    else:
                        self.state, self.small = "small", bytearray()
            elif self.state == "data":
                n = min(self.need, mv.nbytes)
                part = mv[:n]
                if n >= hashed_file.PARALLEL_HASH_BYTES:
                    fut = hashed_file.HASH_THREAD.submit(crc32, part, self.crc)
                    try:
                        self.out.write(part)
                    finally:
                        self.crc = fut.result()
                else:
                    self.crc = crc32(part, self.crc)
                    self.out.write(part)
                self.need -= n
                self.size += n
                mv = mv[n:]
                if self.need == 0:
                    self.state = "descriptor"
            elif self.state == "descriptor":
                self.out.write(self._descriptor(mv, self.crc, self.size))
                return
            else:  # "small": a record torch adds; its descriptor tells where its data ends
                ends = (mv.nbytes in (16, 24) and bytes(mv[:4]) == _DESCRIPTOR
                        and int.from_bytes(mv[12:16] if mv.nbytes == 16 else mv[16:24], "little") == len(self.small))
                if not ends and not self.small and bytes(mv[:4]) in (_LOCAL, _CENTRAL):
                    self._end_record(0, 0)  # it was empty
                    continue
                if not ends:
                    self.small += mv
                    return
                data = self.small
                if bytes(self.name).endswith(_SERIALIZATION_ID):
                    data = self._serialization_id(data)
                crc = crc32(data)
                self.out.write(data)
                self.out.write(self._descriptor(mv, crc, len(data)))
                return

    def _serialization_id(self, data: bytearray) -> bytearray:
        """torch's id: 20 digits of combined name hashes (kept), 20 of combined CRCs (ours)."""
        if len(data) != 40 or not bytes(data).isdigit():
            self._bad(f"serialization id {bytes(data)!r}")
        combined = 0
        for _, crc, size in self.records:
            if size:
                combined = _hash_combine(combined, crc)
        return bytearray(bytes(data[:20]) + f"{combined:020d}".encode())

    def finish(self) -> None:
        """Write the central directory with each entry's CRC (one entry per record, in order)."""
        if self.out.discarding:
            return
        try:
            t, pos, i = self.tail, 0, 0
            while t[pos:pos + 4] == _CENTRAL:
                name_len, extra_len, comment_len = struct.unpack("<HHH", t[pos + 28:pos + 34])
                name = bytes(t[pos + 46:pos + 46 + name_len])
                if i >= len(self.records) or self.records[i][0] != name:
                    self._bad(f"central directory entry {name!r} is not record {i}")
                t[pos + 16:pos + 20] = struct.pack("<I", self.records[i][1] & 0xFFFFFFFF)
                pos += 46 + name_len + extra_len + comment_len
                i += 1
            if i != len(self.records) or not t:
                self._bad(f"{len(self.records)} records, {i} central directory entries")
            self.out.write(memoryview(t))
            self.tail = bytearray()
        except BaseException as e:  # noqa: B036 - reported by the file's check()
            self.out._fail(e)

