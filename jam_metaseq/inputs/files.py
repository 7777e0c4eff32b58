"""Class 2, files that change while they are read (issue 27 §2).

An input rewritten in place while ``jam-ckpt`` streams it gives an output mixed from two versions
whose recorded sha256 matches neither. ``FileSnapshot.of(path)`` before reading and
``check_unchanged()`` after (before anything made from it is committed) refuses that. Timestamps
have the file system's granularity: a same-size rewrite within one tick is caught only by a hash of
the content (``jam-ckpt --hash-sources full``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .refusal import InputError


@dataclass(frozen=True)
class FileSnapshot:
    """What identifies a file's content without reading it: device, inode, size, mtime and ctime
    (ctime changes on every write and cannot be set back by ``touch``)."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str | os.PathLike) -> "FileSnapshot":
        st = os.stat(path)
        return cls(str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def check_unchanged(self) -> None:
        """``InputError`` when the file was replaced, rewritten or resized since the snapshot (an
        output made from it would mix two versions)."""
        try:
            now = FileSnapshot.of(self.path)
        except OSError as e:
            raise InputError(f"disappeared while it was read ({e.strerror or e})", reason="changed",
                             where=self.path) from None
        if now != self:
            what = [k for k in ("dev", "ino", "size", "mtime_ns", "ctime_ns") if getattr(now, k) != getattr(self, k)]
            raise InputError(f"changed while it was read ({', '.join(what)} differ): nothing was written from it; "
                             "run again once it is complete", reason="changed", where=self.path)
