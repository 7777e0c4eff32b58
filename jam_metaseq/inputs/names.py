"""Class 1: names from input that become paths (issue 27 §1).

A name, stem, part name or file name taken from an argument, a manifest or a plan is joined to a
directory the program writes into; ``../victim/in`` or ``a/b`` would write elsewhere, a NUL or a
newline breaks the file system call or the messages and scripts that show it. ``safe_component``
accepts exactly one plain path component. ``resolve_output_dir`` resolves an output directory and
turns a symlink loop into a one-line error instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import unicodedata
from pathlib import Path

from jam_metaseq.errors import JamError

MAX_COMPONENT_BYTES = 255
"""NAME_MAX of Linux and macOS file systems: a longer component fails at open() with ENAMETOOLONG."""

_SEPARATORS = {"/", "\\"} | {s for s in (os.sep, os.altsep) if s}
"""Refused in a component on every OS: a checkpoint named ``a\\b`` on Linux is two on Windows."""


def _problem(name: str, *, max_bytes: int) -> str | None:
    if name == "":
        return "is empty"
    if name in (".", ".."):
        return "is not a file name"
    sep = next((s for s in _SEPARATORS if s in name), None)
    if sep is not None:
        return f"contains {sep!r}: a name must be a single path component"
    bad = next((c for c in name if c == "\0" or unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        return f"contains the control character {bad!r}"
    size = len(name.encode("utf-8"))
    if size > max_bytes:
        return f"is {size} bytes long, more than the {max_bytes} a file name may have"
    return None


def safe_component(name: str, *, what: str, max_bytes: int = MAX_COMPONENT_BYTES) -> str:
    """``name`` itself when it is one plain path component; else a ``JamError`` naming ``what``
    (``--name``, ``the plan's 'name'``...) and the value. Refused: empty, ``.``, ``..``, ``/`` or
    ``\\`` anywhere, NUL and other control characters (newline, tab, ESC), lone surrogates, more than
    ``max_bytes`` bytes in UTF-8."""
    if not isinstance(name, str):
        raise JamError(f"{what} must be a string, got {type(name).__name__}")
    problem = _problem(name, max_bytes=max_bytes)
    if problem is not None:
        raise JamError(f"{what} {name!r} {problem}")
    return name


def resolve_output_dir(path: str | os.PathLike, *, what: str = "output directory") -> Path:
    """The absolute, symlink-free form of an output directory (it need not exist yet).

    A symlink loop on the way (``-o`` pointing to itself, two links pointing to each other) is a
    ``JamError`` naming the path, as is a component the file system refuses (too long, not a
    directory); Python raises ``RuntimeError`` or ``OSError(ELOOP)`` there, depending on the version."""
    p = Path(path)
    try:
        return p.resolve()
    except RuntimeError as e:  # Python < 3.13: "Symlink loop from '...'"
        raise JamError(f"{p}: {what} is a symlink loop ({e})") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise JamError(f"{p}: {what} is a symlink loop") from None
        raise JamError(f"{p}: cannot resolve the {what} ({e.strerror or e})") from None
