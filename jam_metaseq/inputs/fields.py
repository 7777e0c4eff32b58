"""Class 3: settings that override what the weights say (issue 27 §3).

Two rules, each with its helper:

- **Every field is validated where it is read** (type, sign, range; ids against the size):
  ``int_field`` / ``str_field`` check one field of a manifest or config and name it with its file.
  ``True`` is not an integer and ``256.0`` or ``256.5`` is not one either: a count read from JSON
  must be written as an integer.
- **What the tensors prove wins**: a flag or a config value that contradicts what the checkpoint's
  tensors (or its own recorded settings) show is a one-line error naming both values (``agree``),
  never a silent override that writes a model the weights do not describe.
"""

from __future__ import annotations

import numbers
from typing import Any, TypeVar

from jam_metaseq.errors import JamError

T = TypeVar("T")


class FieldError(JamError, ValueError):
    """A manifest or config field of the wrong type or out of range; the message names the file and
    the field."""


def int_field(value: Any, *, name: str, source: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` when it is an integer (Python or numpy, not bool) in ``[lo, hi]``;
    else ``FieldError`` ``source: field 'name' must be ...``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FieldError(f"{source}: field '{name}' must be an integer, got {value!r}")
    v = int(value)
    if lo is not None and v < lo:
        raise FieldError(f"{source}: field '{name}' must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise FieldError(f"{source}: field '{name}' must be <= {hi}, got {v}")
    return v


def str_field(value: Any, *, name: str, source: str, optional: bool = False) -> str | None:
    """``value`` when it is a string (or None with ``optional``); else ``FieldError``."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise FieldError(f"{source}: field '{name}' must be a string, got {value!r}")
    return value


def agree(*, what: str, given: T | None, given_by: str, proven: T, proven_by: str) -> T:
    """What the tensors prove wins (module docstring): returns ``proven``; ``given`` (a flag or a
    config's claim, None when absent) must equal it, else a ``JamError`` naming both values, e.g.
    ``--heads says 8 attention heads, but a.pt's tensors have 4``."""
    if given is not None and given != proven:
        raise JamError(f"{given_by} says {given} {what}, but {proven_by} has {proven}: what the tensors hold "
                       f"wins; drop {given_by} or correct it")
    return proven
