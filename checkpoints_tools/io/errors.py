"""How writing an output fails: ``OutputError`` (the output cannot be written) and
``OutputWriteError`` (a write failed; the message names the output file and the OS's cause)."""

from __future__ import annotations

import errno as errno_mod
from pathlib import Path

from jam_metaseq.errors import JamError


class OutputError(JamError, ValueError):
    """The output cannot be written (exists, no space, bad target layout)."""


class OutputWriteError(OutputError):
    """Writing an output file failed (disk full, file too large, I/O error); ``errno`` as the
    OS reported it. The message names the output file."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def write_error(path: Path, e: OSError) -> OutputWriteError:
    """``e`` (from writing ``path``) as an ``OutputWriteError`` naming the file and the OS's cause."""
    cause = f"{e.strerror} (errno {e.errno}{', ' + errno_mod.errorcode.get(e.errno, '') if e.errno else ''})" \
        if e.strerror else str(e)
    return OutputWriteError(f"{path}: cannot write: {cause}", e.errno)
