"""Provenance: the manifest's record of each source an operation read (path, layout, and each
file's size and sha256), hashed while the stream reads the same bytes, or taken from the
source's own jam-ckpt manifest when the file is unchanged (``HASH_SOURCES``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from checkpoints_tools.io.hashed_file import sha256_file
from checkpoints_tools.readers import Reader
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.inputs import loads_json

HASH_SOURCES = ("auto", "full", "none")
"""How sources are hashed into the manifest: ``auto`` takes a file's sha256 from the manifest.json
next to it when that manifest (a jam-ckpt output's) lists the file with its current size and the
file is not newer than the manifest, and reads and hashes it otherwise; ``full`` always reads
and hashes; ``none`` records sizes only."""

HASH_LEAD = 512 << 20
"""How far (bytes) a source file's hashing may run ahead of the stream's reads of that file."""


def _hash_policy(hash_sources: bool | str) -> str:
    if hash_sources is True:
        return "auto"
    if hash_sources is False:
        return "none"
    if hash_sources not in HASH_SOURCES:
        raise ValueError(f"hash_sources must be one of {HASH_SOURCES}, got {hash_sources!r}")
    return hash_sources


class SourceHash:
    """The manifest's record of one source, hashed while the stream reads it.

    One thread per file reads it sequentially and hashes it (hashlib and file reads release the
    GIL), paced to stay at most ``HASH_LEAD`` bytes ahead of the stream's position in that
    reader (``Reader.read_fraction``): the pages the hash reads are the ones the stream is about
    to read, so each byte comes from the disk once even when the parents do not fit in the page
    cache (a hash pass before or after the stream would read them twice). ``release`` lifts the
    pacing (the stream is done, or failed); ``result`` waits for the record."""

    def __init__(self, role: str, reader: Reader, *, policy: str) -> None:
        self.role, self.reader, self.policy = role, reader, policy
        self._released = threading.Event()
        self._cancelled = False
        self._record = {"role": role, "path": str(reader.path), "format": reader.format, "mp": reader.mp,
                        "fsdp": reader.fsdp, "files": {}}
        rows = getattr(reader, "record", None)
        if rows is not None:  # a parent read with the rows its vocabulary manifest adds
            self._record["vocab_rows"] = rows()
        self._threads: dict[str, threading.Thread] = {}
        self._results: dict[str, str | BaseException] = {}
        known: dict[Path, tuple[dict[str, Any], int]] = {}
        todo = []
        for f in reader.files:
            st = f.stat()
            rec: dict[str, Any] = {"bytes": st.st_size, "sha256": None, "sha256_from": None}
            if policy == "auto":
                if f.parent not in known:
                    known[f.parent] = _manifest_hashes(f.parent)
                table, mtime = known[f.parent]
                entry = table.get(f.name)
                if isinstance(entry, dict) and entry.get("bytes") == st.st_size and entry.get("sha256") \
                        and st.st_mtime_ns <= mtime:
                    rec.update(sha256=entry["sha256"], sha256_from="manifest")
            if policy != "none" and rec["sha256"] is None:
                todo.append(f)
            self._record["files"][str(f)] = rec
        for f in todo:  # daemon threads: a paced hash never holds up the exit of a failed run
            t = threading.Thread(target=self._run, args=(f,), name=f"jam-ckpt-hash:{f.name}", daemon=True)
            self._threads[str(f)] = t
            t.start()

    def _run(self, path: Path) -> None:
        try:
            self._results[str(path)] = self._hash_file(path)
        except BaseException as e:  # re-raised by result()
            self._results[str(path)] = e

    def _wait_until_allowed(self, pos: int, size: int) -> None:
        """Block while byte ``pos`` of a ``size``-byte file is more than ``HASH_LEAD`` ahead of
        the reader's progress (until ``release``)."""
        while not self._released.is_set() and pos > self.reader.read_fraction() * size + HASH_LEAD:
            self._released.wait(0.005)

    def _hash_file(self, path: Path, chunk: int = 8 << 20) -> str | None:
        size = path.stat().st_size

        def before_read(pos: int) -> bool:
            self._wait_until_allowed(pos, size)
            return not self._cancelled

        return sha256_file(path, chunk=chunk, before_read=before_read)

    def release(self) -> None:
        self._released.set()

    def cancel(self) -> None:
        """Stop hashing (the stream failed); the threads end at their next chunk."""
        self._cancelled = True
        self._released.set()

    def result(self) -> dict[str, Any]:
        self.release()
        for name, t in self._threads.items():
            t.join()
            r = self._results[name]
            if isinstance(r, BaseException):
                raise CheckpointError(f"{name}: hashing the source failed: {r}") from r
            self._record["files"][name].update(sha256=r, sha256_from="read")
        return self._record


def source_record(role: str, reader: Reader, *, hash_sources: bool | str) -> SourceHash:
    """The manifest's record of one source (``SourceHash``: hashed while the stream reads it).
    ``hash_sources``: see ``HASH_SOURCES`` (True = auto, False = none)."""
    return SourceHash(role, reader, policy=_hash_policy(hash_sources))


def _manifest_hashes(d: Path) -> tuple[dict[str, Any], int]:
    """(files table, mtime_ns) of a jam-ckpt manifest.json in ``d``, or ({}, 0)."""
    m = d / "manifest.json"
    try:
        data = loads_json(m.read_bytes(), where=str(m), allow_nan=True)  # bounded; older outputs may hold NaN
        if isinstance(data, dict) and data.get("created_by") == "jam-ckpt" and isinstance(data.get("files"), dict):
            return data["files"], m.stat().st_mtime_ns
    except (OSError, ValueError):
        pass
    return {}, 0
