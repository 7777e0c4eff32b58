"""Class 2, zip records (issue 27 §2): a torch ``.pt`` is a zip whose records may lie.

A 1.6 MB deflated ``data.pkl`` can inflate to 1.5 GB, and a zip may hold two records of one name
(the short one first): torch reads one, a checker the other. ``unique_zip_names`` refuses the
second; ``open_zip_member`` / ``read_zip_member`` inflate one record in chunks, never past a cap nor
past the size its header states, so nothing is ever held whole in memory.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any, Iterator

from .refusal import InputError

ZIP_CHUNK = 1 << 20
"""Inflate zip records this many bytes at a time."""


def unique_zip_names(zf: zipfile.ZipFile, *, where: str) -> dict[str, zipfile.ZipInfo]:
    """name -> record of a zip, refusing two records of one name (``zipfile`` and torch each pick
    one of them, not necessarily the same)."""
    out: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename in out:
            raise InputError(f"the zip holds two records named {info.filename!r}", reason="duplicate_record",
                             where=where)
        out[info.filename] = info
    return out


class _BoundedMember(io.RawIOBase):
    """A zip record's inflated bytes, read in pieces, refusing more than ``max_bytes`` or more or
    fewer than the size its header records."""

    def __init__(self, raw: Any, *, name: str, expected: int, max_bytes: int, where: str) -> None:
        super().__init__()
        self._raw, self._name, self._expected, self._max, self._where = raw, name, expected, max_bytes, where
        self._read = 0
        if expected > max_bytes:
            raise InputError(f"record {name!r} inflates to {expected} bytes, over the bound of {max_bytes}",
                             reason="inflate_bound", where=where)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = min(len(b), self._max - self._read + 1)
        data = self._raw.read(want)
        self._read += len(data)
        if self._read > self._max or self._read > self._expected:
            raise InputError(f"record {self._name!r} inflates to more than its header's {self._expected} bytes"
                             if self._read > self._expected else
                             f"record {self._name!r} inflates to more than {self._max} bytes",
                             reason="inflate_bound", where=self._where)
        if not data and self._read != self._expected:
            raise InputError(f"record {self._name!r} inflates to {self._read} bytes, its header says "
                             f"{self._expected}", reason="inflate_bound", where=self._where)
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_zip_member(zf: zipfile.ZipFile, name: str, *, max_bytes: int, where: str) -> io.BufferedReader:
    """A file object over one record's inflated bytes (for ``pickle.Unpickler``, ``np.load`` ...)
    that never holds more than a chunk and refuses to inflate past ``max_bytes`` or past the size the
    record's header states. The zip's names must be unique (``unique_zip_names``)."""
    info = unique_zip_names(zf, where=where).get(name)
    if info is None:
        raise InputError(f"the zip has no record {name!r}", reason="missing_record", where=where)
    member = _BoundedMember(zf.open(info), name=name, expected=info.file_size, max_bytes=max_bytes, where=where)
    return io.BufferedReader(member, buffer_size=ZIP_CHUNK)


def read_zip_member(zf: zipfile.ZipFile, name: str, *, max_bytes: int, where: str,
                    chunk: int = ZIP_CHUNK) -> Iterator[bytes]:
    """One record's inflated bytes in chunks of at most ``chunk`` (``open_zip_member``'s bounds)."""
    with open_zip_member(zf, name, max_bytes=max_bytes, where=where) as f:
        while True:
            piece = f.read(chunk)
            if not piece:
                return
            yield piece
